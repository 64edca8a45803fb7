"""A dual-stack NodePort Service in front of test pods, and waiting until the EndpointSlice
controller lists their addresses (kube-proxy programs a backend only once it is listed)."""

from __future__ import annotations

from typing import Any

from .controlplane import wait_until


def dual_stack_service(core: Any, namespace: str, name: str, selector: dict[str, str], *, port_name: str,
                       port: int, target_port: int) -> dict:
    """Create it; returns its {"cluster_ips": [IPv4, IPv6], "node_port": N}."""
    core.create_namespaced_service(namespace, {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name},
        "spec": {"type": "NodePort", "selector": selector,
                 "ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv4", "IPv6"],
                 "ports": [{"name": port_name, "protocol": "TCP", "port": port, "targetPort": target_port}]}})
    svc = core.read_namespaced_service(name, namespace)
    made = {"cluster_ips": list(svc.spec.cluster_ips), "node_port": svc.spec.ports[0].node_port}
    assert len(made["cluster_ips"]) == 2 and made["node_port"], made
    return made


def ready_backends(discovery: Any, namespace: str, service: str) -> set[str]:
    """The addresses of ready endpoints in the Service's EndpointSlices (both families)."""
    slices = discovery.list_namespaced_endpoint_slice(
        namespace, label_selector=f"kubernetes.io/service-name={service}").items
    return {ip for s in slices for e in s.endpoints or []
            if e.conditions is None or e.conditions.ready is not False for ip in e.addresses}


def wait_backends_listed(api_client: Any, namespace: str, service: str, addresses: set[str]) -> None:
    import kubernetes

    discovery = kubernetes.client.DiscoveryV1Api(api_client)
    wait_until(lambda: ready_backends(discovery, namespace, service) >= addresses,
               f"the EndpointSlices of Service {namespace}/{service} to list {sorted(addresses)} as ready")
