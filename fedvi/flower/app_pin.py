"""The site runs the app it reviewed: an offline pin of the Flower app bundle (FAB).

In a Flower deployment the coordinator ships the ClientApp code (the FAB built by ``flwr run``)
and every site runs it. flwr 1.42's ``flower-supernode --trusted-entities`` accepts only FABs
that carry verification records, which the SuperLink fills only for apps fetched from Flower
Hub: with a self-hosted SuperLink it refuses every local app. This module pins the app offline:

- :func:`app_hash` is the sha256 Flower gives the FAB of an app folder (the bytes
  ``flwr build`` writes and ``flwr run <folder>`` ships: ``flwr.cli.build.build_fab_from_disk``);
  ``python -m fedvi app-hash <folder>`` prints it for the app a site reviews.
- :func:`run_site` (``python -m fedvi site --app-sha256 <hash> <flower-supernode options>``)
  starts ``flower-supernode --isolation process`` from the site's own install and, in place of
  ``flower-superexec``, starts each ClientApp process itself (:func:`pinned_clientapp`, Flower's
  own ``flwr-clientapp`` runner) with the pin: a task whose FAB hash differs (the FAB's content
  or the hash it is installed under) is refused before the FAB is installed or any of its code
  runs. The site prints one line (``fedvi site: refused app ...``) and the server gets a failed
  reply from that node.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PIN_ERROR = "fedvi site: refused app"


class AppPinError(RuntimeError):
    """The FAB the SuperNode handed over is not the app this site pinned."""


def app_hash(folder: str | os.PathLike) -> str:
    """sha256 (hex) of the FAB Flower builds from the app ``folder`` (``flwr build`` / ``flwr
    run <folder>``): what a site pins with ``--app-sha256``."""
    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(Path(folder))).hexdigest()


def check_fab(fab, pin: str) -> None:
    """Raise :class:`AppPinError` unless the FAB's content and its stated hash are ``pin``."""
    got = hashlib.sha256(fab.content).hexdigest()
    if got != pin or fab.hash_str != pin:
        raise AppPinError(
            f"{PIN_ERROR}: its sha256 is {got} (stated {fab.hash_str or 'none'}), this site "
            f"runs only {pin}"
        )


def pinned_clientapp(argv=None) -> None:
    """One ClientApp task, as ``flwr-clientapp`` runs it, refusing a FAB other than the pin."""
    import flwr.supernode.runtime.run_clientapp as runner
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    p = argparse.ArgumentParser(prog="python -m fedvi.flower.app_pin")
    p.add_argument("--runtime-api-address", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--insecure", action="store_true")
    p.add_argument("--root-certificates")
    p.add_argument("--parent-pid", type=int)
    p.add_argument("--app-sha256", required=True)
    args = p.parse_args(argv)
    pull, install = runner.pull_task_input, runner.install_from_fab
    received = {}

    def pull_recorded(client):
        """Flower's task input; the FAB is kept for the check below."""
        message, context, run, fab = pull(client)
        received["fab"] = fab
        return message, context, run, fab

    def install_checked(content, *args_, **kwargs):
        """Flower's FAB installation, after the pin check: a refused FAB is never installed
        or loaded, and Flower's runner sends the server an error reply for the task."""
        try:
            check_fab(received["fab"], args.app_sha256)
        except AppPinError as exc:
            print(exc, file=sys.stderr, flush=True)
            raise
        return install(content, *args_, **kwargs)

    # Flower's runner looks these names up in its module when it runs a task: the check sits
    # between receiving the task and installing its FAB; the rest is Flower's own code.
    runner.pull_task_input = pull_recorded
    runner.install_from_fab = install_checked
    runner.run_clientapp(
        runtime_api_address=args.runtime_api_address,
        token=args.token,
        insecure=args.insecure,
        certificates=validate_and_resolve_root_certificates(args.root_certificates, args.insecure),
        parent_pid=args.parent_pid,
        runtime_dependency_install=False,
    )


def _option(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def _check_pin(pin: str) -> str:
    pin = pin.strip().lower()
    if len(pin) != 64 or any(c not in "0123456789abcdef" for c in pin):
        raise SystemExit(f"fedvi site: --app-sha256 must be 64 hex digits, got {pin!r}")
    return pin


def run_site(pin: str, supernode_args: list[str], poll: float = 0.5) -> int:
    """Run ``flower-supernode --isolation process <supernode_args>`` and launch each ClientApp
    task it gets with the pin; returns the SuperNode's exit status."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    pin = _check_pin(pin)
    if _option(supernode_args, "--isolation") not in (None, "process"):
        raise SystemExit("fedvi site: the pinned site runs the SuperNode with --isolation process")
    supernode_args = [a for a in supernode_args if not a.startswith("--isolation")]
    port = _option(supernode_args, "--port") or "9094"
    host = _option(supernode_args, "--host") or "127.0.0.1"
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    address = f"{host}:{port}"
    # The Runtime API uses TLS when the SuperNode serves it with a certificate.
    runtime_ca = _option(supernode_args, "--ssl-ca-certfile")
    insecure = _option(supernode_args, "--ssl-certfile") is None
    exe = Path(sys.executable).with_name("flower-supernode")
    cmd = [str(exe) if exe.exists() else "flower-supernode", *supernode_args]
    node = subprocess.Popen([*cmd, "--isolation", "process"])
    stop = {"now": False}

    def _stop(signum, frame):
        stop["now"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    client = None
    children: list[subprocess.Popen] = []
    try:
        while not stop["now"] and node.poll() is None:
            if client is None:
                try:
                    client = RuntimeHttpClient.from_server_address(
                        server_address=address,
                        insecure=insecure,
                        root_certificates=validate_and_resolve_root_certificates(
                            runtime_ca, insecure
                        ),
                        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
                        retry_invoker=make_simple_http_retry_invoker(),
                    )
                except Exception:  # the SuperNode's Runtime API is not up yet
                    time.sleep(poll)
                    continue
            try:
                res = client.AcquireTask(
                    AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
                )
            except Exception:  # not up yet, or restarting: try again
                time.sleep(poll)
                continue
            if res.HasField("task") and res.token:
                task_cmd = [
                    sys.executable,
                    "-m",
                    "fedvi.flower.app_pin",
                    "--runtime-api-address",
                    address,
                    "--token",
                    res.token,
                    "--parent-pid",
                    str(os.getpid()),
                    "--app-sha256",
                    pin,
                ]
                if insecure:
                    task_cmd.append("--insecure")
                elif runtime_ca:
                    task_cmd += ["--root-certificates", runtime_ca]
                children.append(subprocess.Popen(task_cmd))
            children = [c for c in children if c.poll() is None]
            time.sleep(poll)
    finally:
        if node.poll() is None:
            node.terminate()
            try:
                node.wait(timeout=15)
            except subprocess.TimeoutExpired:
                node.kill()
        for c in children:
            if c.poll() is None:
                c.terminate()
        if client is not None:
            client.close()
    return node.returncode if node.returncode is not None else 0


if __name__ == "__main__":
    pinned_clientapp()
