"""Naming a flow's remote end cluster-wide: a pod, a Service, a node, or outside the cluster.

The agent names what its node knows (its own pods, its node's addresses); the operator names
the rest from what it watches:
- a pod's own address (not hostNetwork) -> the pod;
- a Service address (each of spec.clusterIPs, spec.externalIPs, status.loadBalancer.ingress[].ip)
  -> the Service (namespace, name) and the port's name when the flow's port is one of the
  Service's TCP ports. With kube-proxy the client's socket stays addressed to the Service, so
  this is what the kernel reports for most pod-to-pod traffic;
- a node's address (Node status.addresses, or a hostNetwork pod's) -> the node; with a
  Service's NodePort as the flow's port, the Service too;
- anything else -> outside the cluster.
A Service end's backend (the agent reads it from its node's conntrack: agent/conntrack.py) is
named like an address: the pod that has it, else the node whose address it is.
Pure: `ServiceIndex` is fed by the Service watch, the rest by the pod and Node watches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

from retransmit_core.api import Backend, Endpoint
from retransmit_core.podindex import PodLookup, canonical_ip, canonical_ips, with_owner


@dataclass(frozen=True)
class ServicePort:
    name: str      # the port's name, or its number when unnamed
    port: int
    node_port: Optional[int]


@dataclass(frozen=True)
class ServiceFacts:
    """What naming needs from a Service object."""

    uid: str
    namespace: str
    name: str
    addresses: tuple[str, ...]
    ports: tuple[ServicePort, ...]

    @classmethod
    def from_object(cls, service: Mapping[str, Any]) -> "ServiceFacts":
        meta, spec, status = service.get("metadata") or {}, service.get("spec") or {}, service.get("status") or {}
        ips = [*(spec.get("clusterIPs") or [spec.get("clusterIP") or ""]), *(spec.get("externalIPs") or []),
               *(i.get("ip") or "" for i in (status.get("loadBalancer") or {}).get("ingress") or [])]
        ports = tuple(ServicePort(p.get("name") or str(p.get("port")), int(p.get("port") or 0), p.get("nodePort"))
                      for p in spec.get("ports") or [] if (p.get("protocol") or "TCP") == "TCP")
        return cls(uid=meta.get("uid") or f"{meta.get('namespace')}/{meta.get('name')}",
                   namespace=meta.get("namespace", ""), name=meta.get("name", ""),
                   addresses=canonical_ips(ip for ip in ips if ip and ip != "None"), ports=ports)

    def port_named(self, port: int, node_port: bool = False) -> Optional[str]:
        for p in self.ports:
            if (p.node_port if node_port else p.port) == port:
                return p.name
        return None


class ServiceIndex:
    """Service address -> Service, NodePort -> Service, fed by Service watch events."""

    def __init__(self) -> None:
        self._services: dict[str, ServiceFacts] = {}
        self._by_address: dict[str, ServiceFacts] = {}
        self._by_node_port: dict[int, ServiceFacts] = {}

    def observe(self, service: Mapping[str, Any], deleted: bool = False) -> None:
        """One watch event, in time proportional to that Service's addresses and ports (the
        operator's start lists every Service as one event each: no rebuild per event)."""
        facts = ServiceFacts.from_object(service)
        old = self._services.pop(facts.uid, None)
        if old is not None:
            for ip in old.addresses:
                if self._by_address.get(ip) is old:
                    del self._by_address[ip]
            for port in old.ports:
                if port.node_port and self._by_node_port.get(port.node_port) is old:
                    del self._by_node_port[port.node_port]
        if deleted:
            return
        self._services[facts.uid] = facts
        self._by_address.update(dict.fromkeys(facts.addresses, facts))
        self._by_node_port.update({p.node_port: facts for p in facts.ports if p.node_port})

    def __len__(self) -> int:
        return len(self._services)

    def at(self, ip: str) -> Optional[ServiceFacts]:
        return self._by_address.get(ip)

    def node_port(self, port: int) -> Optional[ServiceFacts]:
        return self._by_node_port.get(port)

    def may_name(self, ip: str, port: int) -> bool:
        """A cheap first look: could (ip, port) be one of these Services' ends? Addresses in
        reports are canonical already (the agent formats them so), so a set lookup decides
        for all but the ends that are then named in full."""
        return ip in self._by_address or port in self._by_node_port


def node_addresses(nodes: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """Address -> node name, from Node objects' status.addresses (InternalIP, ExternalIP)."""
    out: dict[str, str] = {}
    for node in nodes:
        name = (node.get("metadata") or {}).get("name", "")
        for address in (node.get("status") or {}).get("addresses") or []:
            if address.get("type") in ("InternalIP", "ExternalIP"):
                ip = canonical_ip(address.get("address") or "")
                if ip:
                    out[ip] = name
    return out


def _as_service(endpoint: Endpoint, service: ServiceFacts, port_name: Optional[str], **more: Any) -> Endpoint:
    return endpoint.model_copy(update={"service": service.name, "namespace": service.namespace,
                                       "service_port": port_name, **more})


def name_backend(backend: Backend, pods: Optional[PodLookup], nodes: Mapping[str, str]) -> Backend:
    """A Service backend's address named: the pod that has it (not hostNetwork), else the node
    whose address it is; unknown addresses stay bare."""
    if backend.pod or backend.node:
        return backend
    ip = canonical_ip(backend.ip)
    if ip is None:
        return backend
    owner = pods.owner(ip) if pods is not None else None
    if owner is not None and owner.pod:
        return backend.model_copy(update={"pod": owner.pod, "namespace": owner.namespace})
    node = nodes.get(ip) or (owner.node if owner is not None else None)
    return backend.model_copy(update={"node": node}) if node else backend


def name_remote(endpoint: Endpoint, pods: Optional[PodLookup], services: ServiceIndex,
                nodes: Mapping[str, str]) -> Endpoint:
    """The remote end named as the module's docstring says, with its backend when the agent
    found one."""
    named = _name_end(endpoint, pods, services, nodes)
    if named.backend is None:
        return named
    backend = name_backend(named.backend, pods, nodes)
    return named if backend == named.backend else named.model_copy(update={"backend": backend})


def _name_end(endpoint: Endpoint, pods: Optional[PodLookup], services: ServiceIndex,
              nodes: Mapping[str, str]) -> Endpoint:
    """An end the agent named already (a pod or a node of its own) stays as it is, except
    that a node's own address at a NodePort (a pod dialling its own node's NodePort) also
    names the Service."""
    if endpoint.pod or endpoint.service:
        return endpoint
    if endpoint.node:
        by_node_port = services.node_port(endpoint.port)
        if by_node_port is None:
            return endpoint
        return _as_service(endpoint, by_node_port, by_node_port.port_named(endpoint.port, node_port=True))
    ip = canonical_ip(endpoint.ip)
    if ip is None:
        return endpoint
    owner = pods.owner(ip) if pods is not None else None
    if owner is not None and owner.pod:
        return with_owner(endpoint, owner)
    service = services.at(ip)
    if service is not None:
        return _as_service(endpoint, service, service.port_named(endpoint.port))
    node = nodes.get(ip) or (owner.node if owner is not None else None)
    if node:
        by_node_port = services.node_port(endpoint.port)
        if by_node_port is not None:
            return _as_service(endpoint, by_node_port, by_node_port.port_named(endpoint.port, node_port=True), node=node)
        return endpoint.model_copy(update={"node": node})
    return endpoint.model_copy(update={"outside": True})


@dataclass(frozen=True)
class ClusterNames:
    """Everything the operator names remote ends from, as one argument."""

    pods: Optional[PodLookup]
    services: ServiceIndex
    nodes: Mapping[str, str]

    def remote(self, endpoint: Endpoint) -> Endpoint:
        return name_remote(endpoint, self.pods, self.services, self.nodes)

