"""Why a site did not answer a round: its node went offline, or it was silent until the timeout.

Flower's ``grid.send_and_receive`` returns only the replies that came; a node that died simply
has none, and the SuperLink's own error reply for it (``Node Unavailable``, sent once the node
missed its heartbeats) comes from the SuperLink's node id, not the site's. :func:`send_and_watch`
pushes a round's messages, pulls the replies and, while it waits, asks the SuperLink which
nodes are online (``grid.get_node_ids()``: the nodes whose heartbeats are current). A node that
leaves that list, or for which the SuperLink answers ``Node Unavailable``, is given up at once
as :class:`NodeOffline`; a node still online but silent at the timeout is a
:class:`RoundTimeout`. Each carries the node id, the site (when known) and the phase, and its
text is a :func:`fedvi.protocol.site_error_message`, so a strategy that reads failures as text
names the cause too.

How soon a dead node is noticed is Flower's: the SuperLink marks a SuperNode offline when it
missed its heartbeat for twice the heartbeat interval (SIGKILL during a round: reported 50 s
after the kill by ``tests/test_deployment.py`` with flwr 1.42's defaults; SIGTERM: about 2 s).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

from flwr.app import Message
from flwr.common.constant import ErrorCode

from fedvi.protocol import site_error_message

#: Seconds between two pulls of the replies and of the node list (Flower's own loop waits 3 s).
POLL_SECONDS = 3.0

#: The causes a round failure can have (``RoundFailure.cause``).
CAUSES = ("offline", "timeout", "site_error")


class RoundFailure(RuntimeError):
    """A site that gave no reply in a round. ``node_id``: its Flower node; ``site``: its
    partition id (``None`` if not known yet); ``phase``; ``seconds``: how long after the round
    started the cause was known."""

    cause = "unknown"

    def __init__(self, node_id: int, site: int | None, phase: str, seconds: float, reason: str):
        super().__init__(site_error_message(site, phase, reason))
        self.node_id, self.site, self.phase, self.seconds = int(node_id), site, phase, seconds
        self.reason = reason


class NodeOffline(RoundFailure):
    """The SuperLink lists the node as offline (its heartbeats stopped)."""

    cause = "offline"

    def __init__(self, node_id: int, site: int | None, phase: str, seconds: float):
        super().__init__(
            node_id,
            site,
            phase,
            seconds,
            f"node {int(node_id)} offline: the SuperLink stopped receiving its heartbeat "
            f"(noticed {seconds:.0f} s into the round)",
        )


class RoundTimeout(RoundFailure):
    """The node is online but sent no reply within the phase's timeout."""

    cause = "timeout"

    def __init__(self, node_id: int, site: int | None, phase: str, seconds: float):
        super().__init__(
            node_id,
            site,
            phase,
            seconds,
            f"no reply within the round timeout ({seconds:.0f} s); node {int(node_id)} is "
            "still online",
        )


def failure_cause(failure) -> str:
    """``"offline"``, ``"timeout"`` or ``"site_error"`` for one entry of the failures list that
    ``aggregate_fit`` receives (a :class:`RoundFailure`, another exception, or a
    ``(proxy, FitRes)`` whose status carries the site's own error)."""
    if isinstance(failure, RoundFailure):
        return failure.cause
    return "site_error"


def _online(grid) -> set[int] | None:
    """The node ids the SuperLink considers online, or ``None`` if it cannot be asked."""
    try:
        return {int(n) for n in grid.get_node_ids()}
    except Exception:  # a lost Runtime API call must not end the round: wait on
        return None


def send_and_watch(
    grid,
    messages: Iterable[Message],
    timeout: float,
    phase: str,
    site_of: Mapping[str, int] | Callable[[str], int | None] = {},  # noqa: B006 (read only)
    poll: float | None = None,
    clock: Callable[[], float] | None = None,
    sleep: Callable[[float], None] | None = None,
    arrivals: dict[int, float] | None = None,
) -> tuple[list[Message], list[RoundFailure]]:
    """Send ``messages`` (one per node) and wait up to ``timeout`` s for their replies.

    Returns ``(replies, failures)``: every reply that came (content or a site's error), and a
    :class:`NodeOffline` for each node that went offline before replying, a
    :class:`RoundTimeout` for each node still silent at the timeout. ``site_of``: the site of a
    node (by its id as a string; a mapping or a function). ``poll``: seconds between pulls
    (default: the Grid's own ``pull_interval``, 0.1 s in simulation, else :data:`POLL_SECONDS`).
    ``arrivals``: filled with the seconds after the push at which each node's reply came."""
    if poll is None:
        poll = float(getattr(grid, "pull_interval", POLL_SECONDS))
    clock = clock or time.monotonic
    sleep = sleep or time.sleep
    messages = list(messages)
    ids = list(grid.push_messages(messages))
    dst = {mid: int(m.metadata.dst_node_id) for mid, m in zip(ids, messages, strict=True)}
    lookup = site_of if callable(site_of) else site_of.get
    pending = set(ids)
    replies: list[Message] = []
    failures: list[RoundFailure] = []
    t0 = clock()

    def give_up(mid: str, kind) -> None:
        pending.discard(mid)
        node = dst[mid]
        # Not logged here: the strategy names every failure once, with its site.
        failures.append(kind(node, lookup(str(node)), phase, clock() - t0))

    while pending:
        for msg in grid.pull_messages(sorted(pending)):
            mid = msg.metadata.reply_to_message_id
            if mid not in pending:
                continue
            if msg.has_error() and msg.error.code == ErrorCode.NODE_UNAVAILABLE:
                give_up(mid, NodeOffline)  # the SuperLink's own reply for a dead node
                continue
            pending.discard(mid)
            replies.append(msg)
            if arrivals is not None:
                arrivals[dst[mid]] = clock() - t0
        if not pending:
            break
        online = _online(grid)
        if online is not None:
            for mid in sorted(pending):
                if dst[mid] not in online:
                    give_up(mid, NodeOffline)
        if not pending:
            break
        left = timeout - (clock() - t0)
        if left <= 0:
            for mid in sorted(pending):
                give_up(mid, RoundTimeout)
            break
        sleep(min(poll, left))
    return replies, failures


class WatchedGrid:
    """A Grid whose ``send_and_receive`` is :func:`send_and_watch`, for workflows that call the
    Grid themselves (Flower's ``SecAggPlusWorkflow``): the round stops waiting for a node the
    SuperLink lists as offline. The failures are kept in :attr:`failures`."""

    def __init__(self, grid, phase: str, site_of=None):
        self._grid, self.phase = grid, phase
        self.site_of = site_of if site_of is not None else {}
        self.failures: list[RoundFailure] = []

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None):
        replies, failures = send_and_watch(
            self._grid,
            messages,
            float("inf") if timeout is None else timeout,
            self.phase,
            self.site_of,
        )
        self.failures += failures
        return replies
