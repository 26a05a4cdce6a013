"""How a Flower site reports its own failures: one line in its log, the safe reason to the server.

- :func:`log_failure`: an expected failure (:data:`fedvi.site_messages.EXPECTED`) is one line
  (:func:`fedvi.site_messages.failure_line`); an unexpected one also gets its traceback. Both
  are appended to ``<output-dir>/fedvi_site<id>.log`` when the site has an output folder.
- :func:`site_errors_mod`: a ClientApp mod that turns the :class:`fedvi.protocol.SiteError` a
  site raises into Flower's error reply itself, so that Flower does not log a traceback and an
  ``Exit Code: 800`` block around the site's one line (the server reads the same reason).
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from logging import ERROR

from flwr.app import Error, Message
from flwr.common.constant import ErrorCode
from flwr.common.logger import log, update_console_handler

from fedvi.protocol import SiteError
from fedvi.site_messages import failure_line, is_expected


def log_path(output_dir: str | None, site: int) -> str | None:
    """The site's failure log, ``<output_dir>/fedvi_site<id>.log`` (``None`` without a folder)."""
    return None if not output_dir else os.path.join(output_dir, f"fedvi_site{site}.log")


def log_failure(site_name: str, phase: str, exc: BaseException, log_file: str | None = None) -> str:
    """Log the failure of ``phase`` at the site (see the module docstring); the line logged."""
    line = failure_line(site_name, phase, exc)
    expected = is_expected(exc)
    log(ERROR, "%s", line, exc_info=None if expected else exc)
    if log_file:
        try:
            os.makedirs(os.path.dirname(log_file) or ".", exist_ok=True)
            with open(log_file, "a") as fh:
                fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
                if not expected:
                    fh.write("".join(traceback.format_exception(exc)))
        except OSError:  # the console line stands; a full disk must not hide the failure
            pass
    return line


def colour_only_on_a_terminal(stream=None) -> None:
    """Flower's console without ANSI colour codes unless it writes to a terminal."""
    stream = stream or sys.stdout
    update_console_handler(colored=bool(getattr(stream, "isatty", lambda: False)()))


def site_errors_mod(msg: Message, ctxt, call_next) -> Message:
    """Reply with the site's :class:`SiteError` as Flower's error message (already logged by the
    site in one line), instead of letting Flower log it as an unhandled exception."""
    try:
        return call_next(msg, ctxt)
    except SiteError as exc:
        return Message(
            Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(exc)), reply_to=msg
        )
