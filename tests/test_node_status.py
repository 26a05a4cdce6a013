"""Why a site gave no reply: node offline (as soon as the SuperLink lists it so), no reply
within the timeout, or the site's own error — on a stand-in Grid with a simulated clock."""

from __future__ import annotations

from types import SimpleNamespace as NS

from flwr.common.constant import ErrorCode

from fedvi.protocol import parse_site_error
from strategies.node_status import (
    NodeOffline,
    RoundTimeout,
    WatchedGrid,
    failure_cause,
    send_and_watch,
)


class FakeGrid:
    """Nodes 11, 12, 13. ``replies_at``: node -> time its reply arrives; ``offline_at``: node ->
    time the SuperLink drops it from the node list; ``unavailable_at``: node -> time the
    SuperLink answers ``Node Unavailable`` for it."""

    def __init__(self, replies_at=None, offline_at=None, unavailable_at=None):
        self.t = 0.0
        self.replies_at = replies_at or {}
        self.offline_at = offline_at or {}
        self.unavailable_at = unavailable_at or {}
        self.node_list_calls = 0

    def clock(self):
        return self.t

    def sleep(self, dt):
        self.t += dt

    def push_messages(self, messages):
        return [f"m{m.metadata.dst_node_id}" for m in messages]

    def get_node_ids(self):
        self.node_list_calls += 1
        return [n for n in (11, 12, 13) if self.offline_at.get(n, float("inf")) > self.t]

    def pull_messages(self, ids):
        out = []
        for mid in ids:
            node = int(mid[1:])
            if self.replies_at.get(node, float("inf")) <= self.t:
                out.append(_msg(mid, node))
            elif self.unavailable_at.get(node, float("inf")) <= self.t:
                err = NS(code=ErrorCode.NODE_UNAVAILABLE, reason="Node Unavailable")
                out.append(_msg(mid, 1, err))
        return out


def _msg(reply_to, src, error=None):
    return NS(
        metadata=NS(reply_to_message_id=reply_to, src_node_id=src),
        has_error=lambda: error is not None,
        error=error,
    )


def _out(*nodes):
    return [NS(metadata=NS(dst_node_id=n)) for n in nodes]


def _run(grid, timeout=120.0, sites=None):
    return send_and_watch(
        grid,
        _out(11, 12, 13),
        timeout,
        "local",
        {"11": 0, "12": 1, "13": 2} if sites is None else sites,
        poll=3.0,
        clock=grid.clock,
        sleep=grid.sleep,
    )


def test_a_node_that_leaves_the_node_list_is_offline_at_once_not_at_the_timeout():
    grid = FakeGrid(replies_at={11: 5.0, 12: 8.0}, offline_at={13: 47.0})
    replies, failures = _run(grid)
    assert sorted(r.metadata.src_node_id for r in replies) == [11, 12]
    (f,) = failures
    assert isinstance(f, NodeOffline) and f.node_id == 13 and f.site == 2 and f.phase == "local"
    assert 47.0 <= f.seconds <= 50.0  # the next poll after the SuperLink dropped it
    assert grid.t < 51.0  # the round did not wait for its 120 s timeout
    site, phase, reason = parse_site_error(str(f))
    assert (site, phase) == (2, "local") and reason.startswith("node 13 offline")
    assert failure_cause(f) == "offline"


def test_the_superlinks_node_unavailable_reply_is_offline():
    grid = FakeGrid(replies_at={11: 1.0, 12: 1.0}, unavailable_at={13: 30.0})
    _, failures = _run(grid)
    (f,) = failures
    assert isinstance(f, NodeOffline) and f.node_id == 13 and 30.0 <= f.seconds < 33.1


def test_a_node_online_but_silent_is_a_timeout_after_the_timeout():
    grid = FakeGrid(replies_at={11: 1.0, 12: 1.0})
    replies, failures = _run(grid, timeout=20.0)
    (f,) = failures
    assert isinstance(f, RoundTimeout) and f.node_id == 13 and f.seconds == 20.0
    assert "no reply within the round timeout (20 s)" in str(f)
    assert failure_cause(f) == "timeout" and len(replies) == 2


def test_a_reply_that_comes_is_kept_and_an_unknown_site_is_none():
    grid = FakeGrid(replies_at={11: 0.0, 12: 0.0}, offline_at={13: 0.0})
    replies, failures = _run(grid, sites={})
    assert len(replies) == 2 and failures[0].site is None and grid.t == 0.0
    assert failure_cause((NS(), NS())) == "site_error"


def test_the_watched_grid_keeps_its_failures():
    grid = FakeGrid(replies_at={11: 1.0}, offline_at={12: 4.0, 13: 4.0})
    watched = WatchedGrid(grid, "refine", {"12": 1})
    watched._grid = grid
    import strategies.node_status as ns

    saved = ns.time.monotonic, ns.time.sleep
    ns.time.monotonic, ns.time.sleep = grid.clock, grid.sleep
    try:
        replies = watched.send_and_receive(_out(11, 12, 13), timeout=60)
    finally:
        ns.time.monotonic, ns.time.sleep = saved
    assert len(replies) == 1
    assert [(f.node_id, f.site) for f in watched.failures] == [(12, 1), (13, None)]
    assert watched.node_list_calls >= 1  # attributes pass through to the Grid
