"""The site's release ledger: an append-only JSON-lines audit log in its own state folder.

One line per release and per refusal (docs/privacy.md)::

    {"time": 1765100000.0, "utc": "2025-12-07T09:33:20Z", "run": "7712", "phase": "refine",
     "round": 3, "clusters": 7, "rows": 4021, "released": "counts, sums, entropies",
     "epsilon": 0.25, "delta": 1e-07, "rho": 0.0011, "floor": 5,
     "request_sha256": "…", "decision": "released", "rule": null}

The site's caps and privacy budget are read from these lines (:mod:`fedvi.gate`), never from a
request, so they hold across runs and restarts. A line holds no cell value, header or path:
only what the site released (its shape and its privacy cost) and why it refused.
``python -m fedvi ledger --state-dir DIR`` prints it as a table.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

LEDGER_FILE = "ledger.jsonl"

#: The columns of a ledger line, in the order the table prints them.
COLUMNS = (
    "utc",
    "run",
    "phase",
    "round",
    "clusters",
    "rows",
    "released",
    "epsilon",
    "delta",
    "floor",
    "decision",
    "rule",
    "request_sha256",
)


class LedgerError(RuntimeError):
    """The ledger cannot be read or written (a site then refuses to release)."""


def request_sha256(arrays: Sequence[np.ndarray], config: Mapping[str, Any]) -> str:
    """sha256 of a request as the site received it (its config, then its arrays' bytes)."""
    h = hashlib.sha256()
    h.update(json.dumps({k: config[k] for k in sorted(config)}, default=str).encode())
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class Ledger:
    """The site's ledger at ``<state_dir>/ledger.jsonl``; ``state_dir=None`` keeps it in
    memory (``federated_fit``: the caps then hold within the call)."""

    def __init__(self, state_dir: str | None = None, clock=time.time):
        self.path = None if state_dir is None else os.path.join(state_dir, LEDGER_FILE)
        self.clock = clock
        self._memory: list[dict] = []

    def entries(self) -> list[dict]:
        """Every line, oldest first."""
        if self.path is None:
            return list(self._memory)
        if not os.path.exists(self.path):
            return []
        try:
            with open(self.path, encoding="utf-8") as fh:
                return [json.loads(line) for line in fh if line.strip()]
        except (OSError, json.JSONDecodeError) as exc:
            raise LedgerError(f"the site's ledger cannot be read ({type(exc).__name__})") from None

    def append(self, **entry) -> dict:
        """Append one line (its time added) and flush it to disk before returning."""
        now = float(self.clock())
        line = {
            "time": now,
            "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            **entry,
        }
        if self.path is None:
            self._memory.append(line)
            return line
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(line, default=_plain) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise LedgerError(
                f"the site's ledger cannot be written ({type(exc).__name__})"
            ) from None
        return line

    def since(self, seconds: float) -> list[dict]:
        """Lines of the last ``seconds``."""
        start = float(self.clock()) - seconds
        return [e for e in self.entries() if e.get("time", 0) >= start]


def _plain(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


def format_table(entries: Iterable[Mapping[str, Any]]) -> str:
    """The ledger as an aligned text table (one row per line; the request hash shortened)."""
    rows = []
    for e in entries:
        row = []
        for c in COLUMNS:
            v = e.get(c)
            if v is None:
                row.append("")
            elif c == "request_sha256":
                row.append(str(v)[:12])
            elif isinstance(v, float):
                row.append(f"{v:.3g}")
            else:
                row.append(str(v))
        rows.append(row)
    header = [c if c != "request_sha256" else "request" for c in COLUMNS]
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def totals(entries: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Releases, refusals, runs and the zCDP rho spent over ``entries``."""
    entries = list(entries)
    released = [e for e in entries if e.get("decision") == "released"]
    return {
        "releases": len(released),
        "refusals": sum(e.get("decision") == "refused" for e in entries),
        "runs": len({e.get("run") for e in released if e.get("phase") == "local"}),
        "rho": float(sum(e.get("rho") or 0.0 for e in released)),
    }
