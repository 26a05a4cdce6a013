"""``python -m strategies.submit``: run fedvi on a federation and exit with its real status.

``flwr run`` exits 0 even when the ServerApp fails, and reports a run's fate only through
``flwr list <connection> --run-id <id>``. This wrapper submits the run, streams its log, waits
for it to finish and exits with:

- 0: completed, every expected site took part;
- 3: completed without some sites (named in ``results.json`` and printed here);
- 1: failed (the reason printed here, and in ``results.json``);
- 2: the run could not be submitted (no connection, bad run config, ...).

    python -m strategies.submit fedvi --output-dir /srv/fedvi/run1 \\
        --overrides "federation.site_ids=[0,1,2] strategy.min_sites=2"

``--output-dir`` is where the ServerApp (on the SuperLink's machine) writes ``results.json``;
when this machine can read it, the exit status and the failures come from it, else from
Flower's run status.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

from strategies import EXIT_CODES
from strategies.console import strip_ansi

EXIT_SUBMIT = 2


def _flwr() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "flwr")
    return here if os.path.exists(here) else (shutil.which("flwr") or "flwr")


def _json(args: list[str], timeout: float = 120) -> dict:
    proc = subprocess.run(
        [_flwr(), *args, "--format", "json"], capture_output=True, text=True, timeout=timeout
    )
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        return {"success": False, "error-message": (proc.stdout + proc.stderr).strip()}


def run_config(args) -> str:
    """The ``--run-config`` string of ``flwr run`` (keys of ``[tool.flwr.app.config]``)."""
    items = {
        "config-name": args.config_name,
        "overrides": args.overrides,
        "output-dir": args.output_dir and os.path.abspath(args.output_dir),
        "resume": args.resume and os.path.abspath(args.resume),
    }
    return " ".join(f"{k}={json.dumps(v)}" for k, v in items.items() if v)


def _copy_lines(src, dst, plain: bool) -> None:
    """Copy the run's log to ``dst`` line by line, without ANSI codes when ``plain``."""
    for line in src:
        dst.write(strip_ansi(line) if plain else line)
        dst.flush()


def _stream(run_id: int, connection: str) -> subprocess.Popen | None:
    try:
        proc = subprocess.Popen(
            [_flwr(), "log", str(run_id), connection, "--stream"],
            stdout=subprocess.PIPE,
            text=True,
            errors="replace",
        )
    except OSError:
        return None
    plain = not sys.stdout.isatty()  # a log file gets no colour codes
    threading.Thread(target=_copy_lines, args=(proc.stdout, sys.stdout, plain), daemon=True).start()
    return proc


def wait_for(run_id: int, connection: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    status: dict = {}
    while time.monotonic() < deadline:
        out = _json(["list", connection, "--run-id", str(run_id)])
        runs = out.get("runs") or []
        if runs:
            status = runs[0]
            if str(status.get("status", "")).startswith("finished"):
                return status
        time.sleep(2)
    return {**status, "status": "timeout"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m strategies.submit", description=__doc__.split("\n")[0]
    )
    p.add_argument("connection", help="the SuperLink connection in $FLWR_HOME/config.toml")
    p.add_argument("--app", default=".", help="the fedvi app folder (default: .)")
    p.add_argument("--output-dir", default="", help="where the ServerApp writes its outputs")
    p.add_argument("--overrides", default="", help="Hydra overrides of configs/")
    p.add_argument("--config-name", default="", help="Hydra config name (default: config)")
    p.add_argument("--resume", default="", help="a model file to extend with this run's sites")
    p.add_argument("--timeout", type=float, default=24 * 3600, help="seconds to wait at most")
    p.add_argument("--quiet", action="store_true", help="do not stream the run's log")
    args = p.parse_args(argv)
    submitted = _json(["run", args.app, args.connection, "--run-config", run_config(args)])
    if not submitted.get("success") or "run-id" not in submitted:
        print(f"fedvi: the run was not submitted: {submitted}", file=sys.stderr)
        return EXIT_SUBMIT
    run_id = int(submitted["run-id"])
    print(f"fedvi: run {run_id} submitted to {args.connection}", flush=True)
    stream = None if args.quiet else _stream(run_id, args.connection)
    try:
        status = wait_for(run_id, args.connection, args.timeout)
    finally:
        if stream is not None:
            try:
                stream.wait(timeout=15)
            except subprocess.TimeoutExpired:
                stream.terminate()
    results_path = os.path.join(args.output_dir, "results.json") if args.output_dir else ""
    results = None
    if results_path and os.path.exists(results_path):
        with open(results_path) as fh:
            results = json.load(fh)
    state = str(status.get("status"))
    details = str(status.get("status-details") or "")
    details = "" if details.strip().upper() in ("", "N/A") else f" ({details})"
    print(f"fedvi: run {run_id}: {state}{details}")
    if results is not None:
        for f in results.get("failures", []):
            print(
                f"fedvi: site {f.get('site')} (node {f.get('node')}) failed in "
                f"{f.get('phase')}: {f.get('error')}"
            )
        for note in results.get("notes", []):
            print(f"fedvi: note: {note}")
        print(f"fedvi: {results['status']}; results in {results_path}")
        return EXIT_CODES.get(results["status"], 1)
    return 0 if state == "finished:completed" else 1


if __name__ == "__main__":
    raise SystemExit(main())
