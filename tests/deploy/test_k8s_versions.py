"""The chart on every Kubernetes release it supports, from its floor (1.30: ValidatingAdmissionPolicy
GA, pod-bound tokens that name their node) to the release the other tests use.

For each release `make k8s-binaries` builds (the pins in tests/harness/k8sbuild/: one list,
tests.harness.controlplane.kubernetes_versions()), one test body on a control plane of its
own: `helm install` of the chart (CRDs, RBAC, admission policies, the operator), then the
API server enforces what the chart declares (a CEL rule of the CRD, both admission policies:
each refuses a bad request with its own message) and one trace counts real retransmits
(nftables loss in a network namespace of the test's own) exactly as the reference counter
does, in the trace's status. One simulated node runs the operator and the agent."""

from __future__ import annotations

import json
import os

import kubernetes
import pytest
import yaml

from retransmit_core.api import GROUP, REPORT_PLURAL, VERSION, NodeStatus
from retransmit_core.naming import report_object
from tests.deploy.kube import apply_trace, get_json, kubectl, unique, wait_for
from tests.deploy.test_install import Release
from tests.deploy.test_upgrade import make_loss
from tests.harness.controlplane import ControlPlane, kubernetes_versions
from tests.harness.netns import LossNamespace
from tests.harness.nodesim import NodeSimulator
from tests.harness.refcount import ReferenceCounter, involving, per_flow

pytestmark = pytest.mark.deploy

NODE = "node-a"


@pytest.fixture(params=kubernetes_versions())
def cluster(request):
    """A control plane of the release `request.param` and one simulated node."""
    with ControlPlane(version=request.param) as cp, NodeSimulator(cp.kubeconfig, (NODE,)) as sim:
        yield cp, sim


def refusal(call) -> str:
    """The message of the 403 that `call` (an API request) must meet."""
    with pytest.raises(kubernetes.client.ApiException) as refused:
        call()
    assert refused.value.status == 403, refused.value
    return json.loads(refused.value.body)["message"]


def policies_type_checked(cp) -> dict[str, list]:
    """Each admission policy's type-checking warnings, once the API server has checked its
    expressions against the CRDs' schemas (status.observedGeneration caught up)."""
    policies = (get_json(cp, "validatingadmissionpolicies") or {}).get("items") or []
    if not policies or any((p.get("status") or {}).get("observedGeneration") != p["metadata"]["generation"]
                           for p in policies):
        return {}
    return {p["metadata"]["name"]: ((p["status"].get("typeChecking") or {}).get("expressionWarnings") or [])
            for p in policies}


def test_the_chart_installs_enforces_its_rules_and_traces_on_each_kubernetes_release(cluster):
    cp, sim = cluster
    with cp.api_client() as api:
        assert kubernetes.client.VersionApi(api).get_code().git_version == cp.version

    release = Release(cp, sim)
    release.install()

    # The CRD's CEL rules are enforced at `kubectl apply` time.
    bad = kubectl(cp, "apply", "-f", "-", check=False, input=yaml.safe_dump({
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "RetransmitTrace", "metadata": {"name": unique("bad")},
        "spec": {"reportInterval": "100ms"}}))
    assert bad.returncode != 0 and "spec.reportInterval must be at least 1s" in bad.stderr, bad.stderr

    with ReferenceCounter() as ref, LossNamespace(prefix="rtkv") as ns:
        ours = set(ns.v4)
        name = unique("versions")
        apply_trace(cp, name, ours, reportInterval="2s")

        def running():
            rows = ((get_json(cp, "rtrace", name) or {}).get("status") or {}).get("nodes") or []
            return [r for r in rows if r["node"] == NODE and r.get("phase") == "Running"]

        wait_for(f"the agent on {NODE} attached and reporting", running, timeout=240)
        make_loss(ns, 24000 + os.getpid() % 20000)
        expected = sum(r for r, _s in per_flow(ref.read(), involving(ours)).values())
    assert expected > 0, "the loss rule made no retransmits: the test proves nothing"

    def counted():
        status = (get_json(cp, "rtrace", name) or {}).get("status") or {}
        rows = {r["node"]: r.get("retransmits", 0) for r in status.get("nodes") or []}
        return status if rows == {NODE: expected} and status["summary"].get("retransmits") == expected else None

    wait_for(f"the trace's status to show {expected} retransmits on {NODE}", counted, timeout=180)

    # Both admission policies are admitted, their expressions type-check against this
    # release's CRDs, and each refuses what it guards against with its own message.
    assert wait_for("the admission policies type-checked", lambda: policies_type_checked(cp)) == {
        f"{release.name}-report-guard": [], f"{release.name}-spec-guard": []}
    (operator,) = release.pods("operator")
    (agent,) = release.pods("agent")
    trace = get_json(cp, "rtrace", name)
    with cp.api_client(token=release.token_of(operator)) as api:
        message = refusal(lambda: kubernetes.client.CustomObjectsApi(api).patch_cluster_custom_object(
            GROUP, VERSION, "retransmittraces", name, {"spec": {"topFlows": 3}}))
    assert f"{release.name}-spec-guard" in message and "may not change a RetransmitTrace's spec" in message, message
    # The agent's pod-bound token names its node (1.30+): another node's report is refused.
    other = report_object(name, trace["metadata"]["uid"], "node-elsewhere", release.ns,
                          NodeStatus(node="node-elsewhere", phase="Running"))
    with cp.api_client(token=release.token_of(agent)) as api:
        message = refusal(lambda: kubernetes.client.CustomObjectsApi(api).create_namespaced_custom_object(
            GROUP, VERSION, release.ns, REPORT_PLURAL, other))
    assert f"{release.name}-report-guard" in message and f"the agent on node {NODE} may write only" in message, message
    print(f"k8s {cp.version}: chart installed, CEL and both admission policies enforced, "
          f"{expected} retransmits counted")
