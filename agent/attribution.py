"""Local-side pod attribution: which pod on this node owns an IP, and which IPs the trace selects.

The agent watches the pods bound to its own node (field selector spec.nodeName=<node>) and
keeps a `PodIndex`: IP -> owner, IPv4 and IPv6 alike. Addresses of hostNetwork pods and the
node's own addresses belong to the node, not to a pod: traffic from them cannot be told
apart. The trace's `namespaces` and `podSelector` select pods; `PodIndex.selected_ips`
turns that selection into the set of local IPs the kernel program filters on
(`RetransmitProgram.set_local_ips`), recomputed whenever a pod comes, changes or goes.

Everything here is pure except `node_addresses()` (reads /proc) and `PodWatcher` (the watch).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

from retransmit_operator.api import LabelSelector

log = logging.getLogger(__name__)

# Pods in these phases no longer own their addresses (the IP may already be reused).
TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})


def normalize_ip(text: str) -> Optional[str]:
    """Canonical text of an address: IPv6 compressed, IPv4-mapped IPv6 as plain IPv4."""
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.compressed


@dataclass(frozen=True)
class Owner:
    """Who an address belongs to: a pod (pod + namespace) or the node itself (node)."""

    pod: Optional[str] = None
    namespace: Optional[str] = None
    node: Optional[str] = None


@dataclass(frozen=True)
class PodFacts:
    """What attribution needs from a Pod object."""

    uid: str
    name: str
    namespace: str
    labels: Mapping[str, str]
    host_network: bool
    ips: tuple[str, ...]
    host_ips: tuple[str, ...]
    terminal: bool

    @classmethod
    def from_object(cls, pod: Mapping[str, Any]) -> "PodFacts":
        """From a Pod as the API returns it (camelCase JSON dict)."""
        meta = pod.get("metadata") or {}
        spec = pod.get("spec") or {}
        status = pod.get("status") or {}
        ips = [p.get("ip") for p in status.get("podIPs") or [] if p.get("ip")]
        if status.get("podIP") and status["podIP"] not in ips:
            ips.insert(0, status["podIP"])
        host_ips = [p.get("ip") for p in status.get("hostIPs") or [] if p.get("ip")]
        if status.get("hostIP") and status["hostIP"] not in host_ips:
            host_ips.insert(0, status["hostIP"])
        return cls(
            uid=meta.get("uid") or f"{meta.get('namespace')}/{meta.get('name')}",
            name=meta.get("name", ""),
            namespace=meta.get("namespace", ""),
            labels=dict(meta.get("labels") or {}),
            host_network=bool(spec.get("hostNetwork")),
            ips=tuple(ip for ip in (normalize_ip(i) for i in ips) if ip),
            host_ips=tuple(ip for ip in (normalize_ip(i) for i in host_ips) if ip),
            terminal=status.get("phase") in TERMINAL_PHASES,
        )


def selector_matches(selector: Optional[LabelSelector], labels: Mapping[str, str]) -> bool:
    """metav1.LabelSelector semantics: matchLabels AND every matchExpression; None matches all."""
    if selector is None:
        return True
    for key, value in selector.match_labels.items():
        if labels.get(key) != value:
            return False
    for req in selector.match_expressions:
        present = req.key in labels
        if req.operator == "In" and not (present and labels[req.key] in req.values):
            return False
        if req.operator == "NotIn" and present and labels[req.key] in req.values:
            return False
        if req.operator == "Exists" and not present:
            return False
        if req.operator == "DoesNotExist" and present:
            return False
    return True


@dataclass(frozen=True)
class PodSelection:
    """The trace's choice of local pods: `namespaces` (empty = all) and `podSelector` (None = all)."""

    namespaces: frozenset[str] = frozenset()
    selector: Optional[LabelSelector] = None

    @property
    def selects_everything(self) -> bool:
        return not self.namespaces and (
            self.selector is None
            or (not self.selector.match_labels and not self.selector.match_expressions)
        )

    def matches(self, pod: PodFacts) -> bool:
        if self.namespaces and pod.namespace not in self.namespaces:
            return False
        return selector_matches(self.selector, pod.labels)


class PodIndex:
    """IP -> owner for one node, fed by pod watch events. Not thread-safe by itself."""

    def __init__(self, node: str, node_addresses: Iterable[str] = ()) -> None:
        self.node = node
        self._node_ips = {ip for ip in (normalize_ip(a) for a in node_addresses) if ip}
        self._pods: dict[str, PodFacts] = {}

    # ---- feeding
    def set_node_addresses(self, addresses: Iterable[str]) -> None:
        self._node_ips = {ip for ip in (normalize_ip(a) for a in addresses) if ip}

    def upsert(self, pod: PodFacts) -> None:
        if pod.terminal:
            self._pods.pop(pod.uid, None)
        else:
            self._pods[pod.uid] = pod

    def remove(self, uid: str) -> None:
        self._pods.pop(uid, None)

    def replace_all(self, pods: Iterable[PodFacts]) -> None:
        """After a (re)list: the listed pods are the whole truth."""
        self._pods = {}
        for pod in pods:
            self.upsert(pod)

    def apply_event(self, kind: str, pod_object: Mapping[str, Any]) -> None:
        """One watch event (ADDED, MODIFIED, DELETED) with the Pod as a JSON dict."""
        facts = PodFacts.from_object(pod_object)
        if kind == "DELETED":
            self.remove(facts.uid)
        elif kind in ("ADDED", "MODIFIED"):
            self.upsert(facts)

    # ---- reading
    @property
    def pods(self) -> list[PodFacts]:
        return list(self._pods.values())

    def node_ips(self) -> set[str]:
        ips = set(self._node_ips)
        for pod in self._pods.values():
            ips.update(pod.host_ips)
            if pod.host_network:
                ips.update(pod.ips)
        return ips

    def owner(self, ip: str) -> Optional[Owner]:
        """The pod owning `ip` on this node, the node itself, or None when unknown."""
        key = normalize_ip(ip)
        if key is None:
            return None
        for pod in self._pods.values():
            if not pod.host_network and key in pod.ips:
                return Owner(pod=pod.name, namespace=pod.namespace)
        if key in self.node_ips() or ipaddress.ip_address(key).is_loopback:
            return Owner(node=self.node)
        return None

    def lookup_table(self) -> dict[str, Owner]:
        """Every known address at once, for attributing many flows in one pass."""
        table = {ip: Owner(node=self.node) for ip in self.node_ips()}
        for pod in self._pods.values():
            if not pod.host_network:
                for ip in pod.ips:
                    table[ip] = Owner(pod=pod.name, namespace=pod.namespace)
        return table

    def selected_ips(self, selection: PodSelection) -> Optional[frozenset[str]]:
        """Local IPs the kernel should keep, or None for no local-IP filter at all.

        hostNetwork pods are never in the set: their address is the node's, so selecting
        them would select every host-network connection of the node.
        """
        if selection.selects_everything:
            return None
        return frozenset(
            ip
            for pod in self._pods.values()
            if not pod.host_network and selection.matches(pod)
            for ip in pod.ips
        )


def attribute(table: Mapping[str, Owner], ip: str, node: str) -> Optional[Owner]:
    """Owner of `ip` from a lookup_table(); loopback addresses belong to `node`."""
    key = normalize_ip(ip)
    if key is None:
        return None
    owner = table.get(key)
    if owner is None and ipaddress.ip_address(key).is_loopback:
        return Owner(node=node)
    return owner


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
    return {ip for ip in (normalize_ip(a) for a in found) if ip}


# ---------------------------------------------------------------- the watch (I/O)

class PodWatcher(threading.Thread):
    """Keeps a PodIndex current from a watch on this node's pods; calls `on_change` after each change.

    List, then watch from the list's resourceVersion; on any error (API server away, 410
    Gone) back off with jitter and list again. Runs as a daemon thread until `stop()`.
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
        failures = 0
        while not self._stop_event.is_set():
            try:
                listed = self._core.list_pod_for_all_namespaces(
                    field_selector=selector, _preload_content=False, _request_timeout=30
                )
                body = json.loads(listed.data)
                with self._lock:
                    self._index.replace_all(PodFacts.from_object(p) for p in body.get("items", []))
                self._on_change()
                self.synced.set()
                version = body.get("metadata", {}).get("resourceVersion")
                failures = 0
                self._watch = watch.Watch()
                for event in self._watch.stream(
                    self._core.list_pod_for_all_namespaces,
                    field_selector=selector,
                    resource_version=version,
                    timeout_seconds=300,
                    _request_timeout=330,
                ):
                    if self._stop_event.is_set():
                        return
                    kind = event.get("type")
                    if kind == "ERROR":
                        break  # e.g. 410 Gone: list again
                    with self._lock:
                        self._index.apply_event(kind, event.get("raw_object") or {})
                    self._on_change()
            except Exception as exc:  # noqa: BLE001 - any API trouble: back off, list again
                if self._stop_event.is_set():
                    return
                delay = self._backoff(failures)
                failures += 1
                log.warning("pod watch on node %s failed (%s); retrying in %.1fs", self._index.node, exc, delay)
                self._stop_event.wait(delay)
