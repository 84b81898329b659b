"""A TEST HOOK: inject a fault into this ClientApp's train task. Inert unless the environment variable
``FEDLINEAR_TEST_FAULTS`` is set (tests/integration/test_faults.py sets it for a local federation).

A SuperNode passes its environment on to the ``flower-superexec`` it starts and that to every
``flwr-clientapp`` process, so a variable set for ``fedlinear run`` reaches the ClientApp of each
task. The value is a comma-separated list of ``PARTY:ACTION@ROUND``; ``PARTY`` is the node's
``partition-id`` (or its ``party-id``), ``ROUND`` the server round, ``ACTION`` one of

* ``raise``: the task raises (an unexpected error: the server gets an error reply);
* ``sleep=SECONDS``: the task sleeps that long, then trains and replies as usual (a straggler);
* ``kill-supernode``: SIGKILL to this task's SuperNode, then to this process (a node dying mid-round).

Example: ``FEDLINEAR_TEST_FAULTS="1:raise@2,2:sleep=60@2,3:kill-supernode@3"``.

With ``FEDLINEAR_TEST_FAULTS_MARKS`` naming a directory, each fault first creates the file
``PARTY-ROUND-ACTION`` there (``sleep=S`` written ``sleep``): a test waits for it, rather than for a
time, to know that the task is under way in whatever process runs it.
"""

from __future__ import annotations

import os
import signal
import time

from flwr.app import Context

ENV = "FEDLINEAR_TEST_FAULTS"
MARKS_ENV = "FEDLINEAR_TEST_FAULTS_MARKS"


class InjectedFault(RuntimeError):
    """The failure ``raise`` injects."""


def inject(context: Context, server_round: int) -> None:
    """Apply the fault ``FEDLINEAR_TEST_FAULTS`` names for this party and round, if any (no-op when unset)."""
    spec = os.environ.get(ENV, "")
    if not spec:
        return
    node = context.node_config
    party = str(node.get("partition-id", node.get("party-id", "")))
    for item in spec.split(","):
        who, _, rest = item.strip().partition(":")
        action, _, when = rest.partition("@")
        if who != party or not when.strip().isdigit() or int(when) != server_round:
            continue
        _mark(party, server_round, action.split("=", 1)[0])
        if action == "raise":
            raise InjectedFault(f"injected by {ENV} in round {server_round}")
        if action.startswith("sleep="):
            time.sleep(float(action.split("=", 1)[1]))
        elif action == "kill-supernode":
            supernode = _ancestor("flower-supernode")
            if supernode is not None:
                os.kill(supernode, signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)


def _mark(party: str, server_round: int, action: str) -> None:
    marks = os.environ.get(MARKS_ENV, "")
    if marks:
        with open(os.path.join(marks, f"{party}-{server_round}-{action}"), "w", encoding="utf-8") as handle:
            handle.write(str(os.getpid()))


def _ancestor(marker: str) -> int | None:
    """The nearest ancestor process whose command line contains ``marker`` (read from /proc). A ClientApp
    forked by the launcher's warm executor (scripts/local/warm_clientapp.py) counts its stand-in, the
    SuperExec's child, as its parent: the executor names it in ``FEDLINEAR_WARM_STAND_IN``."""
    stand_in = os.environ.get("FEDLINEAR_WARM_STAND_IN", "")
    pid = int(stand_in) if stand_in.isdigit() else os.getppid()
    for _ in range(16):
        if pid <= 1:
            return None
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if marker.encode() in handle.read():
                    return pid
            with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as handle:
                stat = handle.read()
            pid = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError):
            return None
    return None
