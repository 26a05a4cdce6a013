"""fedvi's version, written once: in ``pyproject.toml`` (``[project] version``, where Flower's
app configuration requires it too). ``fedvi.__version__`` is the installed distribution's
version; run from a checkout or an app bundle that is not installed, it is read from the
``pyproject.toml`` beside the package."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path


def _version() -> str:
    try:
        return importlib.metadata.version("fedvi")
    except importlib.metadata.PackageNotFoundError:
        pass
    try:  # a checkout or a Flower app bundle: the project file beside the package
        text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    except OSError:
        return "0+unknown"
    m = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
    return m.group(1) if m else "0+unknown"


__version__ = _version()
