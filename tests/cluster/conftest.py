"""Cluster-layer fixtures on top of tests/conftest.py (control_plane, node_simulator, kube,
namespace): typed API handles, the install as a user does it, the embedded operator, the
reference counter, a pod pair and traces (helpers in tests/harness/tracecluster.py)."""

from __future__ import annotations

import os
import stat
import uuid
from typing import Any

import kubernetes
import pytest
import yaml

from retransmit_core.api import GROUP, PLURAL, REPORT_PLURAL
from retransmit_operator.main import EmbeddedOperator
from tests.harness.controlplane import wait_gone, wait_until
from tests.harness.refcount import ReferenceCounter
from tests.harness.tracecluster import (
    AGENT_SA,
    MANIFESTS,
    REPORT_GUARD,
    ROOT,
    SYSTEM_NS,
    Pods,
    Trace,
    apply_manifest,
    operator_settings,
)


@pytest.fixture(scope="session", autouse=True)
def _root() -> None:
    # The node simulator creates network namespaces and runs pods as root processes.
    assert os.geteuid() == 0, "cluster tests create network namespaces: run them as root"


@pytest.fixture
def core(kube):
    return kubernetes.client.CoreV1Api(kube)


@pytest.fixture
def apps(kube):
    return kubernetes.client.AppsV1Api(kube)


@pytest.fixture(scope="module")
def installed(control_plane):
    """CRD, namespace and the agent's ServiceAccount + RBAC from manifests/, as a user installs them."""
    with control_plane.api_client() as api:
        for name in MANIFESTS:
            for doc in yaml.safe_load_all((ROOT / "manifests" / name).read_text()):
                if doc:
                    apply_manifest(api, doc)
        ext = kubernetes.client.ApiextensionsV1Api(api)
        for plural in (PLURAL, REPORT_PLURAL):
            wait_until(lambda: any(c.type == "Established" and c.status == "True"
                                   for c in ext.read_custom_resource_definition(f"{plural}.{GROUP}").status.conditions or []),
                       f"the CRD {plural} to be established")
    yield control_plane
    # Leave the shared cluster as found (the deploy tests install the chart into a cluster
    # without retransmit-system): everything but the CRD, which other modules use too.
    with control_plane.api_client() as api:
        core = kubernetes.client.CoreV1Api(api)
        rbac = kubernetes.client.RbacAuthorizationV1Api(api)
        admission = kubernetes.client.AdmissionregistrationV1Api(api)
        for delete in (lambda: core.delete_namespace(SYSTEM_NS),
                       lambda: rbac.delete_cluster_role_binding(AGENT_SA),
                       lambda: rbac.delete_cluster_role(AGENT_SA),
                       lambda: admission.delete_validating_admission_policy_binding(REPORT_GUARD),
                       lambda: admission.delete_validating_admission_policy(REPORT_GUARD)):
            try:
                delete()
            except kubernetes.client.ApiException as e:
                if e.status != 404:
                    raise
        wait_gone(lambda: core.read_namespace(SYSTEM_NS), f"namespace {SYSTEM_NS} deleted", timeout=120)


@pytest.fixture(scope="module")
def agent_state(tmp_path_factory):
    """The agent command the DaemonSet runs: retransmit-agent, except on a node whose marker
    file exists, where it is pointed (--tracefs) at a tracefs without the tcp tracepoints."""
    state = tmp_path_factory.mktemp("agent")
    empty = state / "tracefs-without-tcp"
    (empty / "events" / "sched").mkdir(parents=True)
    wrapper = state / "agent"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ -e "{state}/broken-$RTRACE_NODE_NAME" ]; then exec retransmit-agent "$@" --tracefs "{empty}"; fi\n'
        'exec retransmit-agent "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return state


@pytest.fixture(scope="module")
def operator(installed, node_simulator, agent_state):
    op = EmbeddedOperator(operator_settings(installed, agent_state)).start()
    yield op
    op.stop()


@pytest.fixture(scope="module")
def reference():
    with ReferenceCounter() as ref:
        yield ref


@pytest.fixture
def objects(kube):
    return kubernetes.client.CustomObjectsApi(kube)


@pytest.fixture
def pods(core, node_simulator, namespace):
    return Pods(core, node_simulator, namespace)


@pytest.fixture
def traces(objects, core):
    made: list[Trace] = []

    def make(**spec: Any) -> Trace:
        t = Trace(objects, core, f"e2e-{uuid.uuid4().hex[:6]}", **spec)
        made.append(t)
        return t
    yield make
    for t in made:
        t.delete()
