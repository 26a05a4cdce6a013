"""The console of fedvi's Flower processes: Flower's round chatter and the traceback of an
expected failure filtered, an unexpected error's traceback kept, no ANSI codes off a terminal."""

from __future__ import annotations

import logging
import sys

import pytest

pytest.importorskip("flwr", reason="the Flower layer: pip install -e .[app]")

from strategies.console import FlowerNoise, strip_ansi  # noqa: E402
from strategies.server_app import ExpectedRunFailure, RunFailed  # noqa: E402

WORKFLOW = "/x/site-packages/flwr/server/workflow/default_workflows.py"
RUNNER = "/x/site-packages/flwr/superlink/runtime/run_serverapp.py"


def record(msg, level=logging.INFO, path=WORKFLOW, exc=None):
    exc_info = (type(exc), exc, None) if exc is not None else None
    return logging.LogRecord("flwr", level, path, 1, msg, (), exc_info)


def test_flowers_round_chatter_is_dropped_fedvis_lines_and_warnings_kept():
    f = FlowerNoise()
    for chatter in (
        "[ROUND 3]",
        "[SUMMARY]",
        "Evaluation returned no results (`None`)",
        "\tHistory",
    ):
        assert not f.filter(record(chatter))
    assert f.filter(record("fedvi round 3: phase refine on sites [0, 1]"))
    assert f.filter(record("a warning", logging.WARNING))
    assert f.filter(record("Starting Flower ServerApp", path=RUNNER))


def test_an_expected_failure_is_one_line_an_unexpected_one_keeps_its_traceback():
    f = FlowerNoise()
    assert f.filter(record("ServerApp raised an exception", logging.ERROR, RUNNER, RunFailed("x")))
    assert f.filter(record("Exit Code: 201\nAn unhandled exception", logging.ERROR, RUNNER))
    exc = ExpectedRunFailure("phase 'local': only 1 of 3 sites can go on")
    assert not f.filter(record("ServerApp raised an exception", logging.ERROR, RUNNER, exc))
    assert not f.filter(record("Exit Code: 201\nAn unhandled exception", logging.ERROR, RUNNER))


def test_colour_codes_are_stripped():
    assert strip_ansi("\x1b[92mINFO \x1b[0m:      fedvi done") == "INFO :      fedvi done"


def test_quiet_flower_turns_colours_off_off_a_terminal():
    from flwr.common.logger import ConsoleHandler

    from strategies.console import quiet_flower

    logger = logging.getLogger("flwr")
    before = list(logger.filters)
    try:
        with open(__file__) as fh:  # a file: not a terminal
            quiet_flower(stream=fh)
        handlers = [h for h in logger.handlers if isinstance(h, ConsoleHandler)]
        assert handlers and not any(h.colored for h in handlers)
    finally:
        logger.filters = before
        from flwr.common.logger import update_console_handler

        update_console_handler(colored=sys.stdout.isatty())
