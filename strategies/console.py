"""A quiet console for fedvi's Flower processes: fedvi's own lines, Flower's warnings, one line
per expected failure.

:func:`quiet_flower` (called by the ServerApp and the sites' ClientApp in their own processes)
adds :class:`FlowerNoise` to Flower's logger and turns colours off when the stream is not a
terminal. :class:`FlowerNoise` drops Flower's round-by-round INFO lines of the legacy workflow
(``[ROUND n]``, the empty evaluation summary, the ``History`` dump, ``[SUMMARY]``), and, for a
failure fedvi expects and has already said in one line (:class:`ExpectedFailure`), Flower's
traceback of it and its ``Exit Code`` block. An unexpected error keeps its traceback.
"""

from __future__ import annotations

import logging
import re
import sys

#: Flower modules whose INFO lines are the legacy workflow's round-by-round chatter.
_CHATTER = re.compile(r"flwr[\\/]server[\\/](workflow|history\.py|server\.py)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ExpectedFailure(Exception):
    """Mixin: a failure fedvi has reported in one line; Flower need not print its traceback."""


class FlowerNoise(logging.Filter):
    """See the module docstring. ``expected_seen``: an expected failure was raised, so Flower's
    ``Exit Code`` block about it is dropped too."""

    def __init__(self):
        super().__init__()
        self.expected_seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], ExpectedFailure):
            self.expected_seen = True
            return False  # fedvi logged the failure in one line already
        if self.expected_seen and str(record.msg).startswith("Exit Code:"):
            return False
        text = record.getMessage()
        if text.startswith("fedvi") or record.levelno >= logging.WARNING:
            return True
        return not _CHATTER.search(record.pathname or "")


def strip_ansi(text: str) -> str:
    """``text`` without ANSI colour codes."""
    return _ANSI.sub("", text)


def quiet_flower(stream=None) -> FlowerNoise:
    """Install :class:`FlowerNoise` on Flower's logger (once) and colour its console only on a
    terminal; returns the filter."""
    from flwr.common.logger import update_console_handler

    logger = logging.getLogger("flwr")
    for f in logger.filters:
        if isinstance(f, FlowerNoise):
            return f
    noise = FlowerNoise()
    logger.addFilter(noise)
    stream = stream or sys.stdout
    update_console_handler(colored=bool(getattr(stream, "isatty", lambda: False)()))
    return noise
