"""Settings declared once: a dataclass field carries its default, its doc and its constraint.

Every group of settings (the model :class:`fedvi.MixtureSpec`, the local fit
:class:`fedvi.FitOptions`, the server's :class:`fedvi.ServerOptions`, a site's
:class:`fedvi.SitePolicy`) is a frozen dataclass whose fields are declared with
:func:`setting`. Everything else derives from those declarations:

- ``__post_init__`` calls :func:`check_fields`, so every constructor checks its values against
  the one table of constraints (in the style of scikit-learn's ``_parameter_constraints``) and
  errors name the parameter, the value and what is allowed;
- :func:`split_options` sorts the keyword arguments of ``MixtureVI``/``federated_fit`` into the
  groups and rejects unknown names;
- :func:`numpydoc` writes the "Parameters" section of their docstrings;
- the Hydra schemas (``strategies/config.py``) and the wire protocol (:mod:`fedvi.protocol`)
  iterate over :func:`dataclasses.fields`.
"""

from __future__ import annotations

import dataclasses
import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np


class Constraint:
    """Checks and normalises one value; ``describe`` says what is allowed."""

    def __call__(self, value: Any) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError


class InvalidSetting(ValueError):
    """A setting has a value its constraint does not allow."""


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


class Interval(Constraint):
    """A number of ``kind`` (``int`` or ``float``) in ``[low, high]`` (``None``: unbounded);
    ``open_low``/``open_high`` exclude the bound."""

    def __init__(self, kind, low=None, high=None, open_low=False, open_high=False):
        self.kind, self.low, self.high = kind, low, high
        self.open_low, self.open_high = open_low, open_high

    def __call__(self, value):
        if self.kind is int:
            if not _is_int(value):
                raise TypeError
            value = int(value)
        else:
            if not _is_real(value):
                raise TypeError
            value = float(value)
            if not np.isfinite(value):
                raise ValueError
        if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
            raise ValueError
        if self.high is not None and (value > self.high or (self.open_high and value == self.high)):
            raise ValueError
        return value

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.open_low else '>='} {self.low}")
        if self.high is not None:
            parts.append(f"{'<' if self.open_high else '<='} {self.high}")
        return what + (" " + " and ".join(parts) if parts else "")


class OneOf(Constraint):
    """One of a fixed set of strings."""

    def __init__(self, *choices: str):
        self.choices = choices

    def __call__(self, value):
        if not isinstance(value, str) or value not in self.choices:
            raise ValueError
        return value

    def describe(self) -> str:
        return "one of " + ", ".join(repr(c) for c in self.choices)


class Boolean(Constraint):
    def __call__(self, value):
        if not isinstance(value, bool | np.bool_):
            raise TypeError
        return bool(value)

    def describe(self) -> str:
        return "True or False"


class Text(Constraint):
    """A non-empty string."""

    def __call__(self, value):
        if not isinstance(value, str) or not value:
            raise TypeError
        return value

    def describe(self) -> str:
        return "a non-empty string"


class Optional(Constraint):
    """``None`` or what ``inner`` allows."""

    def __init__(self, inner: Constraint):
        self.inner = inner

    def __call__(self, value):
        return None if value is None else self.inner(value)

    def describe(self) -> str:
        return f"None or {self.inner.describe()}"


class Pattern(Constraint):
    """A string matching a regular expression (whole string)."""

    def __init__(self, regex: str, described: str):
        self.regex, self.described = re.compile(regex), described

    def __call__(self, value):
        if not isinstance(value, str) or not self.regex.fullmatch(value):
            raise ValueError
        return value

    def describe(self) -> str:
        return self.described


class PositivePair(Constraint):
    """Two positive numbers, as a tuple."""

    def __call__(self, value):
        if isinstance(value, str | bytes) or not isinstance(value, Iterable):
            raise TypeError
        pair = tuple(value)
        if len(pair) != 2 or not all(_is_real(v) and float(v) > 0 for v in pair):
            raise ValueError
        return tuple(float(v) for v in pair)

    def describe(self) -> str:
        return "two positive numbers (a, b)"


class Levels(Constraint):
    """Categorical levels per variable: ``None`` (inferred from the data), one integer >= 2
    for every variable, or one integer >= 1 per variable (a tuple)."""

    def __call__(self, value):
        if value is None:
            return None
        if _is_int(value):
            if int(value) < 2:
                raise ValueError
            return int(value)
        if isinstance(value, str | bytes) or not isinstance(value, Iterable):
            raise TypeError
        levels = tuple(value)
        if not levels or not all(_is_int(v) and int(v) >= 1 for v in levels):
            raise ValueError
        return tuple(int(v) for v in levels)

    def describe(self) -> str:
        return "None, an integer >= 2, or a list of integers >= 1 (one per variable)"


class Names(Constraint):
    """``None`` or distinct non-empty strings, as a tuple."""

    def __call__(self, value):
        if value is None:
            return None
        if isinstance(value, str | bytes) or not isinstance(value, Iterable):
            raise TypeError
        names = tuple(value)
        if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
            raise ValueError
        return names

    def describe(self) -> str:
        return "None or a list of distinct, non-empty names"


class IntList(Constraint):
    """``None`` or distinct integers >= 0, as a sorted tuple."""

    def __call__(self, value):
        if value is None:
            return None
        if isinstance(value, str | bytes) or not isinstance(value, Iterable):
            raise TypeError
        items = tuple(value)
        if not all(_is_int(v) and int(v) >= 0 for v in items) or len(set(items)) != len(items):
            raise ValueError
        return tuple(sorted(int(v) for v in items))

    def describe(self) -> str:
        return "None or a list of distinct integers >= 0"


def setting(default: Any, doc: str, check: Constraint) -> Any:
    """A dataclass field with its default, one-line ``doc`` and constraint ``check``."""
    return dataclasses.field(default=default, metadata={"doc": doc, "check": check})


def check_value(owner: str, name: str, value: Any, constraint: Constraint) -> Any:
    """``constraint(value)``, or an :class:`InvalidSetting` naming the parameter, the value and
    what is allowed."""
    try:
        return constraint(value)
    except (TypeError, ValueError):
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        raise InvalidSetting(
            f"{owner}{name}={shown} is not allowed: expected {constraint.describe()}"
        ) from None


def check_fields(obj: Any, owner: str = "") -> None:
    """Check (and normalise in place) every field of a frozen settings dataclass."""
    for f in dataclasses.fields(obj):
        constraint = f.metadata.get("check")
        if constraint is None:
            continue
        value = check_value(owner, f.name, getattr(obj, f.name), constraint)
        object.__setattr__(obj, f.name, value)


def field_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def split_options(options: Mapping[str, Any], classes: Sequence[type], where: str) -> list:
    """Sort keyword ``options`` into one instance of each class in ``classes`` (their fields are
    disjoint); an unknown name is an error that lists the allowed ones."""
    known: dict[str, type] = {}
    for cls in classes:
        for name in field_names(cls):
            known[name] = cls
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise InvalidSetting(f"{where}: unknown parameter(s) {unknown}; allowed: {sorted(known)}")
    return [cls(**{k: v for k, v in options.items() if known[k] is cls}) for cls in classes]


def as_dict(obj: Any) -> dict[str, Any]:
    """The fields of a settings dataclass (tuples become lists: JSON- and YAML-friendly)."""
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def numpydoc(*classes: type, skip: Iterable[str] = ()) -> str:
    """A numpydoc "Parameters" block for the fields of ``classes``."""
    lines = []
    skip = set(skip)
    for cls in classes:
        for f in dataclasses.fields(cls):
            if f.name in skip or "doc" not in f.metadata:
                continue
            default = f.default
            lines.append(f"{f.name} : {f.metadata['check'].describe()}, default {default!r}")
            lines.append(f"    {f.metadata['doc']} (:class:`{cls.__name__}`)")
    return "\n".join(lines)
