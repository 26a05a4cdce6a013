"""fedvi's version, defined once: pyproject.toml reads it (``[tool.setuptools.dynamic]``), so the
installed distribution's metadata and ``fedvi.__version__`` agree."""

__version__ = "0.2.0"
