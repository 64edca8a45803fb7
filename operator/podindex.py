"""A cluster-wide index from pod IP to pod, for remote-side attribution of flows.

Fed by the operator's watch on pods (every namespace); IPv4 and IPv6 addresses alike, in
canonical form (IPv4-mapped IPv6 folds to IPv4). A hostNetwork pod's address is its node's:
it attributes to the node, never to one of the pods sharing it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Protocol


@dataclass(frozen=True)
class PodRef:
    pod: Optional[str]
    namespace: Optional[str]
    node: Optional[str]
    host_network: bool = False


class PodLookup(Protocol):
    def lookup(self, ip: str) -> Optional[PodRef]: ...


def canonical_ip(text: str) -> Optional[str]:
    """'fd00:0::1' -> 'fd00::1', '::ffff:10.0.0.1' -> '10.0.0.1'; None when not an address."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.compressed


def pod_ips(pod: Mapping[str, Any]) -> list[str]:
    status = pod.get("status") or {}
    texts = [entry.get("ip", "") for entry in status.get("podIPs") or []] or [status.get("podIP") or ""]
    return sorted({ip for ip in (canonical_ip(t) for t in texts if t) if ip})


class PodIndex:
    """IP -> PodRef. One IP may briefly belong to two pods (a dying and a new one): the pod
    seen last wins, and deleting the old one leaves the new one in place."""

    def __init__(self) -> None:
        self._by_ip: dict[str, dict[str, PodRef]] = {}  # ip -> pod uid -> ref (insertion = recency)
        self._ips_of: dict[str, list[str]] = {}          # pod uid -> ips

    def __len__(self) -> int:
        return len(self._by_ip)

    def observe(self, pod: Mapping[str, Any], deleted: bool = False) -> None:
        """Apply one watch event's pod body."""
        meta = pod.get("metadata") or {}
        uid = meta.get("uid") or f"{meta.get('namespace')}/{meta.get('name')}"
        self._forget(uid)
        phase = (pod.get("status") or {}).get("phase")
        if deleted or phase in ("Succeeded", "Failed"):  # finished pods release their IPs
            return
        spec = pod.get("spec") or {}
        host_network = bool(spec.get("hostNetwork"))
        ref = PodRef(
            pod=None if host_network else meta.get("name"),
            namespace=None if host_network else meta.get("namespace"),
            node=spec.get("nodeName"),
            host_network=host_network,
        )
        ips = pod_ips(pod)
        for ip in ips:
            self._by_ip.setdefault(ip, {})[uid] = ref
        if ips:
            self._ips_of[uid] = ips

    def replace_all(self, pods: Iterable[Mapping[str, Any]]) -> None:
        self._by_ip.clear()
        self._ips_of.clear()
        for pod in pods:
            self.observe(pod)

    def _forget(self, uid: str) -> None:
        for ip in self._ips_of.pop(uid, []):
            owners = self._by_ip.get(ip)
            if owners is not None:
                owners.pop(uid, None)
                if not owners:
                    del self._by_ip[ip]

    def lookup(self, ip: str) -> Optional[PodRef]:
        key = canonical_ip(ip)
        owners = self._by_ip.get(key) if key else None
        if not owners:
            return None
        refs = list(owners.values())
        pods = [r for r in refs if not r.host_network]
        return (pods or refs)[-1]
