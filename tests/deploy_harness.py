"""Helpers for deployment tests: real ``flower-superlink`` / ``flower-supernode`` processes.

Imported by the deployment tests; holds no tests. Checked against flwr 1.42.0 (see
docs/deployment.md for what was verified and how long things take).

- ``free_port`` / ``port_open`` / ``wait_port``: ports chosen at run time (never 8000 or
  9094, Flower's defaults).
- ``Processes``: every process a test starts, each in a session of its own; leaving it ends
  them all, their process groups and their descendants, whatever happens.
- ``extract_steps`` / ``run_step``: run the ```` ```bash ```` blocks of a Markdown file that
  follow an ``<!-- step: NAME -->`` comment, exactly as written, with shell variables set by
  the test (the README's recipes).
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
#: Flower's default ports (SuperLink HTTP API, SuperNode runtime API): never used here.
RESERVED_PORTS = frozenset({8000, 9094})


def exe(name: str) -> str:
    """The console script ``name`` next to this Python, else ``name`` (looked up on PATH)."""
    path = BIN / name
    return str(path) if path.exists() else name


# --- ports ------------------------------------------------------------------------------------
#: Ports handed out in this process (never twice, though the first may not be bound yet).
_GIVEN: set[int] = set()


def free_port(host: str = "0.0.0.0") -> int:
    """A TCP port that is free on ``host`` now (bound on all interfaces by default, so a
    SuperLink started with ``--host 0.0.0.0`` can take it too), chosen at random below the
    kernel's ephemeral range (32768-60999 here): an outgoing connection of another process
    never takes it between this check and the server's bind. Never 8000 or 9094."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(20000, 32768)
        if port in RESERVED_PORTS or port in _GIVEN:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    raise RuntimeError("no free port")


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    with socket.socket() as s:
        s.settimeout(timeout)
        return s.connect_ex((host, port)) == 0


def wait_port(
    host: str, port: int, timeout: float = 60.0, proc: subprocess.Popen | None = None
) -> float:
    """Wait until ``host:port`` accepts connections; the seconds it took. Raises
    ``RuntimeError`` if ``proc`` exits first, ``TimeoutError`` after ``timeout`` s."""
    t0 = time.monotonic()
    while not port_open(host, port):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{host}:{port} not open after {timeout} s")
        time.sleep(0.2)
    return time.monotonic() - t0


# --- TLS material and SuperNode keys ---------------------------------------------------------


# --- the app ----------------------------------------------------------------------------------


# --- processes --------------------------------------------------------------------------------
def flower_env(flwr_home: str | os.PathLike, base: Mapping[str, str] | None = None) -> dict:
    """``base`` (default ``os.environ``) with an isolated ``FLWR_HOME``, no runtime dependency
    installation, no telemetry or update check (tests never reach out), unbuffered Python
    output and this Python's ``bin`` first on ``PATH``."""
    env = dict(os.environ if base is None else base)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PYTHONUNBUFFERED="1",
    )
    env["PATH"] = str(BIN) + os.pathsep + env.get("PATH", "")
    Path(flwr_home).mkdir(parents=True, exist_ok=True)
    return env


def _children_map() -> dict[int, list[int]]:
    """``{ppid: [pid, ...]}`` from ``/proc`` (empty where there is no ``/proc``)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return children
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        # ``pid (comm) state ppid ...``; comm may hold spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux ``/proc``; ``[]`` elsewhere)."""
    children = _children_map()
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _signal_tree(pid: int, extra: Iterable[int], sig: int) -> None:
    """``sig`` to the process group of ``pid`` and to each pid in ``extra`` and its group
    (Flower starts the SuperLink's ``flower-superexec`` in a session of its own)."""
    pgids = set()
    for p in [pid, *extra]:
        try:
            pgids.add(os.getpgid(p))
        except ProcessLookupError:
            continue
    own = os.getpgrp()
    for g in pgids - {own}:
        try:
            os.killpg(g, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for p in extra:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _snapshot(procs: Iterable[subprocess.Popen]) -> list[tuple[subprocess.Popen, list[int]]]:
    return [(p, descendants(p.pid)) for p in procs]


def kill_trees(
    procs: Iterable[subprocess.Popen], sig: int = signal.SIGTERM, grace: float = 10.0
) -> None:
    """End each process (started with ``start_new_session=True``), its process group and
    every descendant, all at once: ``sig`` first, ``SIGKILL`` for whatever is left after
    ``grace`` s. Descendants are found before signalling (``/proc``), so children that
    Flower starts in sessions of their own (the SuperLink's ``flower-superexec``) or that
    are re-parented when their parent dies are ended too."""
    trees = _snapshot(procs)
    for proc, kids in trees:
        if proc.poll() is None or kids:
            _signal_tree(proc.pid, kids, sig)
    deadline = time.monotonic() + grace
    for proc, kids in trees:
        try:
            proc.wait(timeout=max(0.05, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        while any(_alive(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.1)
    for proc, kids in trees:
        _signal_tree(proc.pid, [k for k in kids if _alive(k)], signal.SIGKILL)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def kill_tree(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
    """``kill_trees([proc], sig, grace)``."""
    kill_trees([proc], sig, grace)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
        return stat[stat.rfind(b")") + 2 :].split()[0] != b"Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True


def processes_using(path: str | os.PathLike) -> list[int]:
    """Pids (not this process) whose ``FLWR_HOME`` lies under ``path`` (Linux ``/proc``).
    With ``path`` a test's own temporary folder this finds exactly what the test started,
    including processes ``flwr`` detaches (a local SuperLink that a ``flwr`` command
    without a connection name starts for the default ``:local:`` connection)."""
    root = str(Path(path).resolve())
    me = os.getpid()
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                environ = fh.read().split(b"\0")
        except OSError:
            continue
        for item in environ:
            if item.startswith(b"FLWR_HOME="):
                home = item[len(b"FLWR_HOME=") :].decode(errors="replace")
                if home == root or home.startswith(root + os.sep):
                    found.append(int(entry))
                break
    return [p for p in found if _alive(p)]


def sweep(path: str | os.PathLike, grace: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL after ``grace`` s, every process ``processes_using(path)``
    finds (and its process group); the pids found."""
    pids = processes_using(path)
    if pids:
        _signal_tree(pids[0], pids, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        _signal_tree(pids[0], [p for p in pids if _alive(p)], signal.SIGKILL)
    return pids


def start_process(
    args: list[str] | str,
    env: Mapping[str, str],
    log: str | os.PathLike,
    cwd: str | os.PathLike | None = None,
    shell: bool = False,
) -> subprocess.Popen:
    """Start ``args`` (or, with ``shell``, the script ``args`` under ``bash -c``) in a
    session of its own, stdin from ``/dev/null``, stdout and stderr appended to ``log``."""
    with open(log, "ab") as fh:
        return subprocess.Popen(
            ["bash", "-c", args] if shell else args,
            cwd=cwd,
            env=dict(env),
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


class Processes:
    """Background processes with logs, ended together (``close``, or leaving the ``with``
    block) whatever happens. ``logs_dir`` gets ``<name>.log`` per process. ``sweep_dir``:
    ``close`` also ends every process whose ``FLWR_HOME`` lies under it (``sweep``)."""

    def __init__(self, logs_dir: str | os.PathLike, sweep_dir: str | os.PathLike | None = None):
        self.logs_dir = Path(logs_dir)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.sweep_dir = sweep_dir
        self.procs: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def log(self, name: str) -> Path:
        return self.logs_dir / f"{name}.log"

    def start(
        self,
        name: str,
        args: list[str] | str,
        env: Mapping[str, str],
        cwd: str | os.PathLike | None = None,
        shell: bool = False,
    ) -> subprocess.Popen:
        """``start_process`` with output to ``<logs_dir>/<name>.log``, kept for ``close``."""
        if name in self.procs:
            raise ValueError(f"a process named {name!r} exists")
        return self.adopt(name, start_process(args, env, self.log(name), cwd, shell))

    def step(
        self, name: str, cmd: str, env: Mapping[str, str], cwd: str | os.PathLike | None = None
    ) -> subprocess.Popen:
        """A Markdown step run in the background (``run_step(..., background=True)``)."""
        return self.start(name, cmd, env, cwd=cwd, shell=True)

    def adopt(self, name: str, proc: subprocess.Popen) -> subprocess.Popen:
        """Take ``proc`` (started in a session of its own) under ``close``."""
        self.procs[name] = proc
        return proc

    def close(self, grace: float = 10.0) -> None:
        """SIGTERM every process tree at once, SIGKILL what is left after ``grace`` s."""
        procs, self.procs = list(self.procs.values()), {}
        try:
            kill_trees(procs, signal.SIGTERM, grace)
        finally:
            if self.sweep_dir is not None:
                sweep(self.sweep_dir)

    def logs(self, n: int = 3000) -> str:
        """The last ``n`` characters of every log in ``logs_dir``."""
        return "\n".join(f"--- {p.name}\n{tail(p, n)}" for p in sorted(self.logs_dir.glob("*.log")))


def tail(path: str | os.PathLike, n: int = 4000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-n:]
    except OSError:
        return ""


# --- Markdown steps ---------------------------------------------------------------------------
_STEP_RE = re.compile(
    r"<!--\s*step:\s*(?P<name>[\w.\-]+)\s*-->\s*\n"  # the marker comment
    r"[ \t]*(?P<fence>`{3,}|~{3,})[ \t]*(?:bash|sh|shell)[^\n]*\n"  # the fence
    r"(?P<body>.*?)"
    r"^[ \t]*(?P=fence)[ \t]*$",
    re.DOTALL | re.MULTILINE,
)


def extract_steps(markdown_text: str) -> dict[str, str]:
    """``{name: commands}`` for every fenced ``bash`` block that directly follows an HTML
    comment ``<!-- step: NAME -->`` (blank lines allowed in between). Duplicate names are an
    error."""
    steps: dict[str, str] = {}
    for m in _STEP_RE.finditer(markdown_text):
        name = m.group("name")
        if name in steps:
            raise ValueError(f"step {name!r} appears twice")
        steps[name] = m.group("body")
    return steps


def run_step(
    cmd: str,
    env: Mapping[str, str],
    background: bool = False,
    cwd: str | os.PathLike | None = None,
    log: str | os.PathLike | None = None,
    timeout: float = 300.0,
    check: bool = True,
) -> subprocess.CompletedProcess | subprocess.Popen:
    """Run one step's commands with ``bash -c`` in ``env`` (which sets the variables the
    block uses, e.g. ``FEDVI_SUPERLINK_PORT``).

    Foreground: ``bash -e -o pipefail``; returns the ``CompletedProcess`` (text output),
    raising ``subprocess.CalledProcessError`` on failure when ``check``. Background (for
    ``flower-superlink`` / ``flower-supernode``): returns the ``Popen`` of a process in a
    session of its own, output to ``log`` (required); end it with ``kill_tree``, or use
    ``Processes.step`` which also ends it."""
    if background:
        if log is None:
            raise ValueError("a background step needs a log file")
        return start_process(cmd, env, log, cwd=cwd, shell=True)
    res = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", cmd],
        cwd=cwd,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if log is not None:
        with open(log, "a") as fh:
            fh.write(f"$ {cmd}\n{res.stdout}{res.stderr}\n")
    if check and res.returncode != 0:
        raise subprocess.CalledProcessError(res.returncode, cmd, res.stdout, res.stderr)
    return res


# --- the federation ---------------------------------------------------------------------------
