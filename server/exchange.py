"""One stage's exchange: push the messages, collect the replies, bounded by a timeout.

Flower 1.42's deployment grid (``HttpGrid.send_and_receive``, flwr/superlink/grid/http_grid.py) pulls
the replies every **3 s**: a stage or round whose last reply lands just after a pull waits up to 3 s
more for nothing, ~1.5 s on average, in every pre-round query stage and every round. Over that grid
:func:`send_and_receive` does what Flower's does (``push_messages``, then ``pull_messages`` of the ids
it pushed until every one has its reply or the timeout passes), through the same public ``Grid``
methods, but polls after 0.05 s, then twice as long each time up to :data:`MAX_POLL` s. The replies
are the same messages; only when they are collected changes. Every other grid (the simulation
engine's ``InMemoryGrid``, which already pulls every 0.1 s; the tests'; the inline engine's) is
asked through its own ``send_and_receive``, unchanged.

Flower 1.42's simulation engine runs the ServerApp as a thread of ``flwr-simulation``, beside the
engine's own threads (``flwr/server/superlink/fleet/vce/vce_api.py``): the dispatch thread
(``add_messages_to_queue``) asks the in-memory state for each node's task in turn, and every ask scans
every stored message of the round (``InMemoryLinkState.get_message_ins``), so while a round's
messages are stored it holds the GIL almost without pause (~2.5-3 ms of CPU per message at 1000
nodes); the worker threads (one per Ray actor) mostly wait on Ray and need the GIL back for a few
microseconds at each step. Under CPython's default switch interval (5 ms) each of those steps waited
for the dispatch thread to be forced off the GIL, so a message spent most of its time in the engine
waiting for its own worker thread to run. :func:`engine_scheduling` lowers the interval for the
ServerApp's run when the grid is the engine's ``InMemoryGrid`` (and only then: the deployment
runtime's ``flwr-serverapp`` and the inline engine are their own processes) and restores it after.
Only when threads run changes, not what they compute.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable, Iterator

from flwr.app import Message
from flwr.serverapp import Grid

FIRST_POLL = 0.05  # seconds to the first pull after the push
MAX_POLL = 0.5  # seconds between pulls at most (Flower's own: 3)


def _http_grid() -> type | None:
    try:
        from flwr.superlink.grid.http_grid import HttpGrid
    except ImportError:  # pragma: no cover - another Flower layout: its own send_and_receive
        return None
    return HttpGrid


def _in_memory_grid() -> type | None:
    try:
        from flwr.superlink.grid.inmemory_grid import InMemoryGrid
    except ImportError:  # pragma: no cover - another Flower layout
        return None
    return InMemoryGrid


# The GIL switch interval (s) while the ServerApp runs inside the simulation engine (CPython's default:
# 0.005). 1000 clients x 3 rounds, numpy engine, five runs interleaved at load 7-16: rounds 2-3 at
# 174-183 updates/s with 0.005, 231-244 with 0.0005, 210 with 0.0001 (more switching); same weights.
ENGINE_SWITCH_INTERVAL = 0.0005


@contextlib.contextmanager
def engine_scheduling(grid: Grid) -> Iterator[None]:
    """While the block runs: the GIL switch interval at most :data:`ENGINE_SWITCH_INTERVAL` when ``grid``
    is Flower's simulation engine's ``InMemoryGrid`` (see the module's note); any other grid: unchanged."""
    in_memory = _in_memory_grid()
    if in_memory is None or not isinstance(grid, in_memory):
        yield
        return
    previous = sys.getswitchinterval()
    sys.setswitchinterval(min(previous, ENGINE_SWITCH_INTERVAL))
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def send_and_receive(grid: Grid, messages: Iterable[Message], timeout: float | None) -> list[Message]:
    """The replies to ``messages`` within ``timeout`` seconds (None: until all have one), as ``grid.send_and_receive``."""
    http = _http_grid()
    if http is None or not isinstance(grid, http) or type(grid).send_and_receive is not http.send_and_receive:
        return list(grid.send_and_receive(messages, timeout=timeout))  # not Flower's 3 s loop: the grid's own
    pending = {mid for mid in grid.push_messages(messages) if mid}
    replies: list[Message] = []
    end = None if timeout is None else time.monotonic() + timeout
    pause = FIRST_POLL
    while pending:
        if end is not None:
            left = end - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(pause, left))
        else:
            time.sleep(pause)
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(msg.metadata.reply_to_message_id for msg in got)
        pause = min(2 * pause, MAX_POLL)
    return replies
