"""``fedlinear node``'s body: a party's SuperNode (stock ``flower-supernode``) with TLS, its own key and
shard, bounded retries, and one line saying why the SuperLink refused it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from typing import Any

from fedlinear.common.errors import FedLinearError
from fedlinear.scripts.deploy import preflight


# What flower-supernode prints for each way it can be refused -> what to tell the party.
REFUSALS: list[tuple[re.Pattern[str], str]] = [
    (
        # Flower's 2004 covers both "no node with this key" and "that node is online already"; the
        # SuperNode is told only the code, so the message names both causes
        re.compile(r"\[code: 2004\]|Failed to activate SuperNode|No SuperNode found|could not be activated", re.I),
        "the SuperLink at {superlink} refused this node's key {key}: it is not registered there "
        "(on the server: flwr supernode register {pub}), or another process holds this identity right now. "
        "If no other node of yours runs with {key}, someone else has this key: ask the operator to check "
        "where it connects from (the Fleet front logs 'node key ... came back from a new address'), "
        "unregister it (flwr supernode unregister NODE_ID) and register a new one "
        "(fedlinear certs --out DIR --rotate NAME)",
    ),
    (
        re.compile(r"\[code: 2001\]|must be registered via the CLI", re.I),
        "the SuperLink at {superlink} requires a registered key; this node presented none",
    ),
    (
        re.compile(r"401 Unauthorized|Invalid SuperNode authentication", re.I),
        "the SuperLink at {superlink} rejected this node's signature for {key} (unregistered meanwhile, "
        "or this machine's clock is off)",
    ),
    (
        re.compile(r"Hostname mismatch|IP address mismatch", re.I),
        "TLS with {superlink}: its certificate does not cover the address dialled",
    ),
    (
        re.compile(r"CERTIFICATE_VERIFY_FAILED|SSL/TLS handshake error", re.I),
        "TLS with {superlink} failed: its certificate is not signed by {ca}",
    ),
    (
        re.compile(r"400 Bad Request", re.I),
        "{superlink} refused the request as malformed (a plaintext connection to a TLS-only Fleet API?)",
    ),
    (
        re.compile(r"Unable to parse the private key", re.I),
        "flower-supernode could not read {key}: " + preflight.KEY_HINT,
    ),
    (
        re.compile(r"Giving up reconnection", re.I),
        "gave up connecting to {superlink} after --max-retries {retries} (is the SuperLink up and reachable?)",
    ),
]


def explain_supernode_failure(output: str, **fmt: Any) -> str | None:
    for pattern, message in REFUSALS:
        if pattern.search(output):
            return message.format(**fmt)
    return None


class _Stop(Exception):
    pass


# How long `fedlinear node` gives the warm ClientApp executor to import Flower (~1.5 s quiet) before it
# says that the node's ClientApps start cold (the stand-in falls back by itself meanwhile).
WARM_READY_TIMEOUT = 60.0


def serve_node(
    superlink: str, ca: str, key: str, values: dict[str, Any], workdir: str, max_retries: int, max_wait_time: float,
    clientappio_port: int | None, verbose: bool,
) -> int:
    """Run the SuperNode (node config ``values``) until it exits (0, or an error explaining a refusal)
    or SIGTERM / SIGHUP (0); ``workdir`` holds the log and the private FLWR_HOME."""
    from fedlinear.scripts.local.flower import config_string, flower_env, free_port
    from fedlinear.scripts.local.processes import ProcessGroup
    from fedlinear.scripts.local.warm_clientapp import WARM_ENV

    os.makedirs(workdir, exist_ok=True)
    log_path = os.path.join(workdir, "supernode.log")
    env = flower_env(os.path.join(workdir, "flwr-home"))
    argv = [
        "flower-supernode", "--superlink", superlink,
        "--root-certificates", ca, "--auth-supernode-private-key", key,
        "--max-retries", str(max_retries), "--max-wait-time", str(max_wait_time),
        "--host", "127.0.0.1", "--port", str(clientappio_port or free_port()),
        "--node-config", config_string(values),
    ]  # fmt: skip
    group = ProcessGroup(die_with_parent=True)  # SIGKILL of `fedlinear node` takes its SuperNode and executor with it
    lines: list[str] = []
    warm = None

    def on_signal(signum, _frame):
        raise _Stop(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        if os.environ.get(WARM_ENV, "").strip() != "0":  # each message's ClientApp forked ready-imported
            warm = _start_warm(group, env, workdir)
        if warm is not None:
            env = warm.env
        proc = group.start("supernode", argv, env, None, stdout=subprocess.PIPE)
        print(f"fedlinear node: SuperNode for {values['data-uri']} connecting to {superlink}; log {log_path}", flush=True)

        def pump() -> None:
            assert proc.stdout is not None
            with open(log_path, "ab") as log:
                for raw in proc.stdout:
                    log.write(raw)
                    log.flush()
                    text = raw.decode("utf-8", "replace").rstrip()
                    lines.append(text)
                    del lines[:-200]
                    if verbose:
                        print(text, flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        code = proc.wait()
        reader.join(timeout=5)
        if code == 0:
            return 0
        pub = key[:-4] + ".pub" if key.endswith(".key") else key + ".pub"
        reason = explain_supernode_failure(
            "\n".join(lines), superlink=superlink, key=key, pub=pub, ca=ca, retries=max_retries
        )
        raise FedLinearError(
            (reason or f"flower-supernode exited with code {code}") + f"; log {log_path}"
        )
    except _Stop:
        print("fedlinear node: stopped", file=sys.stderr, flush=True)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            group.stop()
        finally:
            if warm is not None:
                warm.close()


def _start_warm(group, env: dict[str, str], workdir: str):
    """The warm ClientApp executor, ready (the SuperNode's first message may come at once), or None
    with a warning: no temporary directory, or it did not start in time. The node then runs Flower's
    cold ClientApps, as it would without it."""
    from fedlinear.scripts.local.warm_clientapp import WarmClientApps

    log_path = os.path.join(workdir, "warm-clientapp.log")
    try:
        warm = WarmClientApps(group, env, log_path)
    except OSError as exc:
        print(f"fedlinear node: warning: no warm ClientApp executor ({exc.strerror or exc}): every ClientApp starts cold",
              file=sys.stderr, flush=True)  # fmt: skip
        return None
    try:
        ready = warm.wait_ready(WARM_READY_TIMEOUT)
    except BaseException:  # SIGTERM while waiting: the group stops the executor, its directory goes here
        warm.close()
        raise
    if ready:
        return warm
    print(f"fedlinear node: warning: the warm ClientApp executor did not start (log {log_path}): every ClientApp "
          "starts cold", file=sys.stderr, flush=True)  # fmt: skip
    warm.close()
    return None
