"""Two operator replicas against one API server: one leads (a coordination.k8s.io Lease),
the other stands by doing nothing, and takes over when the leader stops."""

from __future__ import annotations

import uuid

import kubernetes
import pytest

from retransmit_core.api import GROUP, PLURAL, VERSION
from retransmit_core.naming import LEADER_LEASE
from retransmit_operator.main import EmbeddedOperator
from tests.harness.controlplane import wait_until
from tests.harness.tracecluster import sleeping_agents_operator

pytestmark = pytest.mark.cluster


def passes(op: EmbeddedOperator) -> float:
    return op.reconciler.metrics.registry.get_sample_value("rtrace_operator_sync_passes_total") or 0.0


def test_two_replicas_elect_one_leader_and_the_standby_takes_over(control_plane, node_simulator, namespace):
    api = control_plane.api_client()
    settings = sleeping_agents_operator(control_plane, api, namespace)
    custom = kubernetes.client.CustomObjectsApi(api)
    leases = kubernetes.client.CoordinationV1Api(api)
    leader = EmbeddedOperator(settings).start()
    standby = EmbeddedOperator(settings).start(wait_ready=False)
    name = f"t-{uuid.uuid4().hex[:8]}"
    try:
        first_holder = leases.read_namespaced_lease(LEADER_LEASE, namespace).spec.holder_identity
        assert first_holder

        # While the leader completes passes, the standby has made none and knows no trace.
        custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "RetransmitTrace", "metadata": {"name": name},
            "spec": {"nodeSelector": {"rtrace.dev/simulated": "true"}}})
        start = passes(leader)

        def leader_busy_standby_idle():
            assert standby.reconciler.last_sync is None and not standby.reconciler.traces, "the standby acted"
            assert standby.alive(), f"the standby died: {standby.error}"
            return passes(leader) >= start + 3 and name in leader.reconciler.traces
        wait_until(leader_busy_standby_idle, "three passes of the leader over the new trace", timeout=120)
        assert not standby.ready.is_set()

        leader.stop()
        assert not leader.alive() and leader.error is None
        wait_until(standby.ready.is_set, "the standby to lead", timeout=120)
        wait_until(lambda: name in standby.reconciler.traces and standby.reconciler.last_sync is not None,
                   "the new leader's first pass over the trace", timeout=120)
        lease = leases.read_namespaced_lease(LEADER_LEASE, namespace).spec
        assert lease.holder_identity not in ("", first_holder) and lease.lease_transitions >= 1
    finally:
        custom.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)
        standby.stop()
        leader.stop()
        api.close()
    assert not standby.alive() and standby.error is None
