"""A dual-stack NodePort Service in front of test pods, and waiting until the EndpointSlice
controller lists their addresses (kube-proxy programs a backend only once it is listed)."""

from __future__ import annotations

from typing import Any, Callable, Optional

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


def _client_flows(summary: dict, client: str) -> dict:
    """The summary's flows of pod `client`, as the reference counter keys them."""
    return {(f["family"], f["local"]["ip"], f["local"]["port"], f["remote"]["ip"], f["remote"]["port"]):
            (f["retransmits"], f.get("synackRetransmits", 0))
            for f in summary.get("topFlows", []) if f["local"].get("pod") == client}


def wait_service_counted(read_summary: Callable[[], dict], namespace: str, service: str, *, client_flows: dict,
                         want_pods: dict, want_totals: Optional[tuple[int, int]] = None, client: str = "client",
                         timeout: float = 180) -> dict:
    """Wait until the trace's summary (read_summary()) holds the reference's `client_flows` of
    pod `client`, flow by flow, each naming a backend pod; counts them all towards the
    Service in topServices; has topPods `want_pods` and, when given, the totals `want_totals`.
    Returns that summary; AssertionError with what it last saw otherwise."""
    want_service = sum(r + s for r, s in client_flows.values())
    last: dict = {}

    def counted() -> Optional[dict]:
        summary = last["summary"] = read_summary() or {}
        services = {(s["namespace"], s["service"]): s["retransmits"] for s in summary.get("topServices", [])}
        pods = {(p["namespace"], p["pod"]): p["retransmits"] for p in summary.get("topPods", [])}
        backends = [f["remote"].get("backend") for f in summary.get("topFlows", []) if f["local"].get("pod") == client]
        done = (_client_flows(summary, client) == client_flows and services.get((namespace, service)) == want_service
                and pods == want_pods and all(b and b.get("pod") for b in backends)
                and (want_totals is None or (summary.get("retransmits"), summary.get("synackRetransmits")) == want_totals))
        return summary if done else None
    try:
        return wait_until(counted, f"the summary to hold {client}'s flows as the reference counts them, each naming "
                          f"its backend pod, {want_service} retransmits towards {namespace}/{service}, topPods "
                          f"{want_pods}" + (f", the totals {want_totals}" if want_totals else ""), timeout=timeout)
    except TimeoutError as e:
        seen = last.get("summary") or {}
        raise AssertionError(f"{e}: topServices {seen.get('topServices')}, topPods {seen.get('topPods')}, totals "
                             f"{(seen.get('retransmits'), seen.get('synackRetransmits'))}, {client}'s flows "
                             f"{[f for f in seen.get('topFlows', []) if f['local'].get('pod') == client]}, "
                             f"reference {client_flows}") from None
