"""The agent's side of pod attribution: the watch on its node's pods and the node's own addresses.

`PodWatcher` keeps the agent's `PodIndex` (retransmit_core.podindex, the attribution rules
the operator uses too) current from a watch on the pods bound to this node (field selector
spec.nodeName=<node>); `node_addresses()` reads the addresses of the node from /proc. Both
are I/O; what they feed is pure.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
from pathlib import Path
from typing import Any, Callable, Optional

from retransmit_core.podindex import PodIndex, canonical_ips
from retransmit_core.watch import list_then_watch

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the node's own addresses

def node_addresses(proc: Path = Path("/proc")) -> set[str]:
    """Addresses configured in this network namespace (the node's, for a hostNetwork agent).

    IPv4 from /proc/net/fib_trie (the `/32 host LOCAL` leaves), IPv6 from /proc/net/if_inet6:
    no netlink library and no `ip` binary needed in the image.
    """
    found: set[str] = set()
    try:
        lines = (proc / "net" / "fib_trie").read_text().splitlines()
    except OSError:
        lines = []
    last_leaf: Optional[str] = None
    for line in lines:
        text = line.strip()
        if text.startswith("|--"):
            last_leaf = text[3:].strip()
        elif "/32 host LOCAL" in text and last_leaf:
            found.add(last_leaf)
    try:
        for line in (proc / "net" / "if_inet6").read_text().splitlines():
            raw = line.split()[0]
            found.add(str(ipaddress.IPv6Address(int(raw, 16))))
    except (OSError, IndexError, ValueError):
        pass
    return set(canonical_ips(found))


# ---------------------------------------------------------------- the watch (I/O)

class PodWatcher(threading.Thread):
    """Keeps a PodIndex current from a watch on this node's pods; calls `on_change` after each change.

    retransmit_core.watch.list_then_watch does the listing, watching and backing off; this
    thread feeds the index under the agent's lock. Runs as a daemon thread until `stop()`.
    """

    def __init__(
        self,
        core_v1: Any,
        index: PodIndex,
        lock: threading.Lock,
        on_change: Callable[[], None],
        backoff: Callable[[int], float],
    ) -> None:
        super().__init__(name="pod-watch", daemon=True)
        self._core = core_v1
        self._index = index
        self._lock = lock
        self._on_change = on_change
        self._backoff = backoff
        self._stop_event = threading.Event()
        self.synced = threading.Event()
        self._watch: Any = None

    def stop(self) -> None:
        self._stop_event.set()
        if self._watch is not None:
            self._watch.stop()

    def run(self) -> None:
        from kubernetes import watch  # the I/O edge only

        selector = f"spec.nodeName={self._index.node}"

        def list_pods() -> dict[str, Any]:
            # Raw JSON: a node's pods parse several times faster than through the client's models.
            listed = self._core.list_pod_for_all_namespaces(
                field_selector=selector, _preload_content=False, _request_timeout=30)
            return json.loads(listed.data)

        def watch_from(version: Optional[str]) -> Any:
            self._watch = watch.Watch()
            return self._watch.stream(self._core.list_pod_for_all_namespaces, field_selector=selector,
                                      resource_version=version, timeout_seconds=300, _request_timeout=330)

        def replace(pods: list, _version: Optional[str]) -> None:
            with self._lock:
                self._index.replace_all(pods)
            self._on_change()
            self.synced.set()

        def observe(pod: dict[str, Any], deleted: bool) -> None:
            with self._lock:
                self._index.observe(pod, deleted=deleted)
            self._on_change()

        list_then_watch(list_pods, watch_from, replace, observe, self._stop_event,
                        f"pods on node {self._index.node}", self._backoff)
