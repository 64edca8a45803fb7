"""Pod attribution, for the agent and the operator alike: which pod (or node) owns an IP.

One `PodIndex`, fed by pod watch events, IPv4 and IPv6 in canonical form (IPv4-mapped IPv6
folds to IPv4), with the same rules on both sides:
- A hostNetwork pod's address is its node's: it attributes to the node, never to one of the
  pods sharing it; a pod with its own network wins over it.
- Finished pods (Succeeded, Failed) release their addresses; an address briefly held by two
  pods (a dying and a new one) belongs to the pod seen last, and deleting the old one leaves
  the new one in place.

It has two scopes. The operator's `PodIndex()` holds every pod, for remote-side attribution.
The agent's `PodIndex(node, node_addresses)` holds its node's pods: there the node's own
addresses, its pods' hostIPs and loopback belong to `node` as well (which of them the trace
selects is the agent's business: retransmit_agent.podselection).

Everything here is pure; the agent's watch and /proc reading are in retransmit_agent.podwatch.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Protocol

from .api import Endpoint

# Pods in these phases no longer own their addresses (the IP may already be reused).
TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})


def canonical_ip(text: str) -> Optional[str]:
    """'fd00:0::1' -> 'fd00::1', '::ffff:10.0.0.1' -> '10.0.0.1', 'fe80::1%eth0' -> 'fe80::1';
    None when not an address."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.compressed


def canonical_ips(texts: Iterable[str]) -> tuple[str, ...]:
    """The addresses among `texts` in canonical form, once each, in their first order."""
    return tuple(dict.fromkeys(ip for ip in (canonical_ip(t) for t in texts if t) if ip))


@dataclass(frozen=True)
class Owner:
    """Who an address (or a socket) belongs to: a pod (pod + namespace) or a node (node alone,
    with the node's systemd unit when a socket's cgroup named one)."""

    pod: Optional[str] = None
    namespace: Optional[str] = None
    node: Optional[str] = None
    unit: Optional[str] = None


def with_owner(endpoint: Endpoint, owner: Optional[Owner]) -> Endpoint:
    """The endpoint attributed to `owner`: pod and namespace for a pod's address, node for a
    node's own (an Owner sets one or the other), and the unit of a node process's socket."""
    if owner is None:
        return endpoint
    return endpoint.model_copy(update={"pod": owner.pod, "namespace": owner.namespace, "node": owner.node,
                                       "unit": owner.unit})


class PodLookup(Protocol):
    def owner(self, ip: str) -> Optional[Owner]: ...


@dataclass(frozen=True)
class PodFacts:
    """What attribution needs from a Pod object."""

    uid: str
    name: str
    namespace: str
    node_name: Optional[str]
    labels: Mapping[str, str]
    host_network: bool
    ips: tuple[str, ...]
    host_ips: tuple[str, ...]
    terminal: bool
    # metadata.creationTimestamp as the API gives it (RFC 3339, whole seconds); None if absent.
    created: Optional[str] = None

    @classmethod
    def from_object(cls, pod: Mapping[str, Any]) -> "PodFacts":
        """From a Pod as the API returns it (camelCase JSON dict)."""
        meta = pod.get("metadata") or {}
        spec = pod.get("spec") or {}
        status = pod.get("status") or {}
        ips = [status.get("podIP")] + [p.get("ip") for p in status.get("podIPs") or []]
        host_ips = [status.get("hostIP")] + [p.get("ip") for p in status.get("hostIPs") or []]
        return cls(
            uid=meta.get("uid") or f"{meta.get('namespace')}/{meta.get('name')}",
            name=meta.get("name", ""),
            namespace=meta.get("namespace", ""),
            node_name=spec.get("nodeName"),
            labels=dict(meta.get("labels") or {}),
            host_network=bool(spec.get("hostNetwork")),
            ips=canonical_ips(ips),
            host_ips=canonical_ips(host_ips),
            terminal=status.get("phase") in TERMINAL_PHASES,
            created=meta.get("creationTimestamp"),
        )


class PodIndex:
    """IP -> Owner, fed by pod watch events: every pod (node None), or one node's pods and
    addresses (see the module's docstring). Not thread-safe by itself."""

    def __init__(self, node: Optional[str] = None, node_addresses: Iterable[str] = ()) -> None:
        self.node = node
        self._node_ips = set(canonical_ips(node_addresses))
        self._pods: dict[str, PodFacts] = {}              # uid -> pod
        self._by_ip: dict[str, dict[str, PodFacts]] = {}  # ip -> uid -> pod (insertion = recency)

    def __len__(self) -> int:
        """Pod addresses known (hostNetwork ones included; not the node's own)."""
        return len(self._by_ip)

    # ---- feeding
    def set_node_addresses(self, addresses: Iterable[str]) -> None:
        self._node_ips = set(canonical_ips(addresses))

    def observe(self, pod: Mapping[str, Any], deleted: bool = False) -> None:
        """Apply one watch event's pod body (ADDED, MODIFIED, or DELETED with `deleted`)."""
        facts = PodFacts.from_object(pod)
        self._forget(facts.uid)
        if deleted or facts.terminal:
            return
        self._pods[facts.uid] = facts
        for ip in facts.ips:
            self._by_ip.setdefault(ip, {})[facts.uid] = facts

    def replace_all(self, pods: Iterable[Mapping[str, Any]]) -> None:
        """After a (re)list: the listed pods are the whole truth."""
        self._pods.clear()
        self._by_ip.clear()
        for pod in pods:
            self.observe(pod)

    def _forget(self, uid: str) -> None:
        gone = self._pods.pop(uid, None)
        for ip in gone.ips if gone else ():
            holders = self._by_ip[ip]
            del holders[uid]
            if not holders:
                del self._by_ip[ip]

    # ---- reading
    @property
    def pods(self) -> list[PodFacts]:
        return list(self._pods.values())

    def node_ips(self) -> set[str]:
        """The addresses that belong to `node`: its own, its pods' hostIPs, hostNetwork pods'
        addresses. Empty for the cluster-wide index."""
        if self.node is None:
            return set()
        ips = set(self._node_ips)
        for pod in self._pods.values():
            ips.update(pod.host_ips)
            if pod.host_network:
                ips.update(pod.ips)
        return ips

    def owner(self, ip: str) -> Optional[Owner]:
        """The pod owning `ip`, the node it belongs to, or None when unknown."""
        key = canonical_ip(ip)
        if key is None:
            return None
        return self._owner(key, self.node_ips())

    def _owner(self, key: str, node_ips: set[str]) -> Optional[Owner]:
        holders = list(self._by_ip.get(key, {}).values())
        pods = [pod for pod in holders if not pod.host_network]
        if pods:
            return Owner(pod=pods[-1].name, namespace=pods[-1].namespace)
        if self.node is None:
            return Owner(node=holders[-1].node_name) if holders else None
        if key in node_ips or ipaddress.ip_address(key).is_loopback:
            return Owner(node=self.node)
        return None

    def uid_table(self) -> dict[str, Owner]:
        """Every known pod by UID (hostNetwork ones included), for naming sockets by the pod
        UID in their cgroup's path."""
        return {uid: Owner(pod=pod.name, namespace=pod.namespace) for uid, pod in self._pods.items()}

    def node_of(self, ip: str) -> Optional[str]:
        """The node of the pod (hostNetwork or not) that last held `ip`; None when no pod does."""
        holders = self._by_ip.get(canonical_ip(ip) or "")
        return next(reversed(holders.values())).node_name if holders else None

    def lookup_table(self) -> dict[str, Owner]:
        """Every known address and its owner at once, for attributing many flows in one pass
        (see `owner_in_table`)."""
        node_ips = self.node_ips()
        table = {key: self._owner(key, node_ips) for key in node_ips | self._by_ip.keys()}
        return {key: owner for key, owner in table.items() if owner is not None}


def owner_in_table(table: Mapping[str, Owner], ip: str, node: str) -> Optional[Owner]:
    """Owner of `ip` from a lookup_table(); loopback addresses belong to `node`."""
    key = canonical_ip(ip)
    if key is None:
        return None
    owner = table.get(key)
    if owner is None and ipaddress.ip_address(key).is_loopback:
        return Owner(node=node)
    return owner
