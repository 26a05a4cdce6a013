"""Names of a site's label files: one file per run and model, never overwritten by another run.

A site writes the labels of run ``r`` under the global model with hash ``h`` to
``labels_site<id>_run<r>_<h[:8]>.csv`` (:func:`label_file_name`), atomically, and reports the
file's name (no folder) to the server, which lists it in ``results.json``. The model's hash
(:func:`model_hash`) is that of its posterior's arrays and schema: the same for the posterior a
site receives in a run and for the run's ``model.npz``, so ``python -m fedvi label`` with that
file writes the same hash into its output. Row numbers in label files are 1-based data rows
(the first row after a header is row 1), as in every error message.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re

#: A label file name as a site reports it (checked by the server before it lists it).
NAME_RE = re.compile(r"^labels_site-?\d+(_run\d+)?_[0-9a-f]{8}\.csv$")


def model_hash(posterior) -> str:
    """16 hex digits identifying a global posterior (:class:`fedvi.Summaries`): its schema and
    the float64 bytes of its arrays, in wire order."""
    h = hashlib.sha256(str(posterior.spec.schema_hash()).encode())
    for a in posterior.to_arrays():
        h.update(str(a.shape).encode())
        h.update(a.astype("<f8", copy=False).tobytes())
    return h.hexdigest()[:16]


def label_file_name(site: int, run_id: int | None, model: str) -> str:
    """``labels_site<id>_run<run>_<model[:8]>.csv`` (``_run<run>`` left out without a run id)."""
    run = "" if run_id is None else f"_run{int(run_id)}"
    return f"labels_site{int(site)}{run}_{model[:8]}.csv"


def is_label_file_name(name) -> bool:
    """Whether ``name`` is a label file name as a site writes it (a base name, no folder)."""
    return isinstance(name, str) and bool(NAME_RE.match(name))


def latest_labels(output_dir: str | os.PathLike, site: int) -> str:
    """The newest label file of ``site`` in ``output_dir`` (``FileNotFoundError`` if none)."""
    found = glob.glob(os.path.join(os.fspath(output_dir), f"labels_site{int(site)}_*.csv"))
    found = [p for p in found if is_label_file_name(os.path.basename(p))]
    if not found:
        raise FileNotFoundError(f"no label file of site {site} in {output_dir}")
    return max(found, key=os.path.getmtime)
