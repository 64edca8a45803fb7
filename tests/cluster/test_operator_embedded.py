"""The operator embedded in a thread of the test process (EmbeddedOperator), for tests that
want to look at its in-memory state."""

from __future__ import annotations

import uuid

import kubernetes
import pytest

from retransmit_core.api import GROUP, PLURAL, VERSION
from retransmit_operator.main import EmbeddedOperator
from tests.harness.controlplane import wait_until
from tests.harness.tracecluster import sleeping_agents_operator

pytestmark = pytest.mark.cluster


def test_embedded_operator_creates_agents_and_indexes_pods_then_stops_cleanly(control_plane, node_simulator, namespace):
    api = control_plane.api_client()
    settings = sleeping_agents_operator(control_plane, api, namespace)
    custom = kubernetes.client.CustomObjectsApi(api)
    apps = kubernetes.client.AppsV1Api(api)
    op = EmbeddedOperator(settings).start()
    name = f"t-{uuid.uuid4().hex[:8]}"
    try:
        wait_until(lambda: custom.list_cluster_custom_object(GROUP, VERSION, PLURAL) is not None, "the CRD to serve")
        custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "RetransmitTrace", "metadata": {"name": name},
            "spec": {"nodeSelector": {"rtrace.dev/simulated": "true"}}})
        wait_until(lambda: apps.read_namespaced_daemon_set(f"rtrace-{name}", namespace), "the DaemonSet")
        assert name in op.reconciler.traces
        assert op.reconciler.reports.synced.is_set()  # its one watch of the nodes' reports listed them
        # The cluster-wide pod index sees the agent pods' (host network) addresses as their nodes'.
        node_a = next(n for n in node_simulator.nodes if n.name == "node-a")
        owner = wait_until(lambda: op.reconciler.pods.owner(node_a.ip_v4), "node-a's address in the pod index")
        assert owner.pod is None and owner.node == "node-a"  # a host-network address is its node's
    finally:
        custom.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)
        op.stop()
        api.close()
    assert not op.alive() and op.error is None
