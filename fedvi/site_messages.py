"""What a site says about its own failures, in its own log, in one line.

The server gets only a safe reason (no header, value, path or row: see
:func:`fedvi.flower.client.safe_reason`); the site's staff get the details in one line of the
site's log: for a schema mismatch which of *its* columns are missing, extra or renamed against
the run's agreed variables (:func:`schema_mismatch`), for a bad value the file, file line, data
row, column and value (:func:`fedvi.io.locate_error`). An expected failure (a policy refusal, a
bad table, a schema mismatch, a bad request, a spent budget) is that one line; only an
unexpected error gets a traceback.

Pure functions, no Flower.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedvi.data import DataError
from fedvi.ledger import LedgerError
from fedvi.policy import PolicyRefusal
from fedvi.protocol import ProtocolError, variable_hashes
from fedvi.settings import InvalidSetting

#: Failures a site expects and explains in one line (no traceback).
EXPECTED = (PolicyRefusal, DataError, InvalidSetting, ProtocolError, LedgerError)


def schema_mismatch(names: Sequence[str], agreed: Sequence[str]) -> str | None:
    """How a table's columns ``names`` (``(D,)``, the site's own) differ from the run's agreed
    variables, given as their name hashes ``agreed`` (:func:`fedvi.protocol.variable_hashes`,
    in the agreed order), or ``None`` when they are the same variables (in any order).

    A column of the table whose hash is not agreed, at the position of an agreed variable the
    table lacks, is reported as renamed (the site cannot know the agreed name, only that its
    column there does not match); the others as extra columns and missing agreed variables.
    Positions are 1-based."""
    names = [str(n) for n in names]
    mine = variable_hashes(names)
    agreed = [str(h) for h in agreed]
    agreed_set, mine_set = set(agreed), set(mine)
    extra = [j for j, h in enumerate(mine) if h not in agreed_set]
    missing = [i for i, h in enumerate(agreed) if h not in mine_set]
    if not extra and not missing:
        return None
    renamed = [j for j in extra if j in set(missing)]
    extra = [j for j in extra if j not in set(renamed)]
    missing = [i for i in missing if i not in set(renamed)]
    parts = []
    if renamed:
        cols = ", ".join(f"{names[j]!r} (#{j + 1})" for j in renamed)
        parts.append(f"renamed: {cols} (the agreed variable at that position is not in this table)")
    if extra:
        cols = ", ".join(f"{names[j]!r} (#{j + 1})" for j in extra)
        parts.append(f"extra: {cols} (not agreed variables)")
    if missing:
        parts.append(
            f"missing: the agreed variables #{[i + 1 for i in missing]} (no column of this table "
            "has their name)"
        )
    return (
        f"schema mismatch: this table's columns differ from the run's {len(agreed)} agreed "
        f"variables: " + "; ".join(parts)
    )


class SchemaMismatch(PolicyRefusal):
    """The site's columns differ from the run's agreed variables. Its message (sent to the
    server) holds only counts; :attr:`detail` (the site's log) names the site's columns."""

    def __init__(self, detail: str, n_renamed: int = 0, n_extra: int = 0, n_missing: int = 0):
        super().__init__(
            "schema",
            "this table's variables differ from the agreed ones "
            f"({n_renamed} renamed, {n_extra} extra, {n_missing} missing); "
            "the site's log names its columns",
        )
        self.detail = detail


def check_schema(names: Sequence[str], agreed: Sequence[str]) -> None:
    """Raise :class:`SchemaMismatch` when ``names`` are not the ``agreed`` variables."""
    detail = schema_mismatch(names, agreed)
    if detail is None:
        return
    mine, agreed_set = variable_hashes(names), set(agreed)
    extra = {j for j, h in enumerate(mine) if h not in agreed_set}
    missing = {i for i, h in enumerate(agreed) if h not in set(mine)}
    renamed = extra & missing
    raise SchemaMismatch(detail, len(renamed), len(extra - renamed), len(missing - renamed))


def is_expected(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure the site explains in one line (no traceback)."""
    return isinstance(exc, EXPECTED)


def failure_line(site: str, phase: str, exc: BaseException) -> str:
    """The one line a site logs about a failure: ``<site>: phase <phase> failed: <what>``; for a
    schema mismatch its columns, for a bad table the file, line, row, column and value."""
    what = getattr(exc, "detail", None) or str(exc) or type(exc).__name__
    what = " ".join(what.split())  # one line, whatever the message held
    if not is_expected(exc):
        what = f"unexpected error ({type(exc).__name__}): {what}"
    return f"{site}: phase {phase} failed: {what}"
