"""The chart's objects as the real API server sees them: server-side dry-run apply of every
variant, Pod Security admission of the operator pod, and the OpenShift SCC binding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from helm.render_manifests import MANIFESTS, helm_template, split_by_template
from tests.deploy.kube import CHART, access_review, helm, install_crd, kubectl, unique

pytestmark = pytest.mark.deploy

SCC_CRD = Path(__file__).resolve().parents[1] / "data" / "openshift" / "scc-crd.yaml"
VARIANTS = {
    "default": [],
    "openshift": ["--set", "openshift.enabled=true"],
    "capabilities": ["--set", "agent.securityMode=capabilities"],
}


@pytest.fixture(scope="module")
def cluster(control_plane):
    install_crd(control_plane)
    return control_plane


@pytest.fixture(scope="module")
def openshift_scc_api(cluster):
    """OpenShift's SecurityContextConstraints kind, served by a stand-in CRD (tests/data)."""
    kubectl(cluster, "apply", "--server-side", "-f", str(SCC_CRD))
    kubectl(cluster, "wait", "--for=condition=Established", "crd/securitycontextconstraints.security.openshift.io",
            "--timeout=60s")
    yield
    kubectl(cluster, "delete", "-f", str(SCC_CRD), "--wait=false")


@pytest.fixture
def release_namespace(cluster):
    """A namespace that exists (namespaced objects cannot be dry-run into a missing one)."""
    name = unique("rtrace-dry")
    kubectl(cluster, "create", "namespace", name)
    yield name
    kubectl(cluster, "delete", "namespace", name, "--wait=false")


@pytest.mark.parametrize("variant", VARIANTS)
def test_server_side_dry_run_accepts_every_object(cluster, openshift_scc_api, release_namespace, variant):
    release = unique("dry")
    rendered = helm_template(*VARIANTS[variant], release=release, namespace=release_namespace)
    docs = split_by_template(rendered)
    done = kubectl(cluster, "apply", "--server-side", "--force-conflicts", "--dry-run=server", "-o", "json", "-f", "-",
                   input=rendered)
    applied = json.loads(done.stdout)
    items = applied.get("items", [applied])
    assert len(items) == len(docs)
    kinds = {i["kind"] for i in items}
    assert {"Deployment", "ClusterRole", "ValidatingAdmissionPolicy", "NetworkPolicy"} <= kinds
    # Dry-run: nothing was created.
    assert kubectl(cluster, "get", "clusterrole", release + "-retransmit-operator", check=False).returncode != 0


def test_server_side_dry_run_refuses_a_broken_object(cluster, release_namespace):
    """The dry-run really validates: a Deployment with a bad field is refused."""
    rendered = helm_template(release=unique("dry"), namespace=release_namespace)
    broken = rendered.replace("readOnlyRootFilesystem: true", "readOnlyRootFilesystem: maybe")
    done = kubectl(cluster, "apply", "--server-side", "--dry-run=server", "-f", "-", input=broken, check=False)
    assert done.returncode != 0 and "readOnlyRootFilesystem" in done.stderr


def test_samples_are_accepted_by_the_crd(cluster):
    done = kubectl(cluster, "apply", "--server-side", "--dry-run=server", "-f", str(MANIFESTS / "samples"))
    assert done.stdout.count("serverside-applied (server dry run)") == 3, done.stdout


def pod_from(template: dict, name: str, namespace: str) -> str:
    return yaml.safe_dump({"apiVersion": "v1", "kind": "Pod",
                           "metadata": {"name": name, "namespace": namespace, "labels": template["metadata"]["labels"]},
                           "spec": template["spec"]})


def test_operator_pod_meets_pod_security_restricted(cluster):
    """Only the agents need `privileged`: the operator pod passes the `restricted` level."""
    ns = unique("rtrace-restricted")
    kubectl(cluster, "create", "namespace", ns)
    try:
        kubectl(cluster, "label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted")
        kubectl(cluster, "-n", ns, "create", "serviceaccount", "psa-retransmit-operator")
        kubectl(cluster, "-n", ns, "create", "serviceaccount", "psa-agent")
        docs = split_by_template(helm_template(release="psa", namespace=ns))
        deployment = yaml.safe_load(docs["operator-deployment.yaml"])
        done = kubectl(cluster, "create", "--dry-run=server", "-f", "-",
                       input=pod_from(deployment["spec"]["template"], "operator", ns), check=False)
        assert done.returncode == 0, done.stderr
        assert "Warning" not in done.stderr, done.stderr

        # The same namespace refuses an agent pod as the operator renders it: the check is real.
        from retransmit_core.api import RetransmitTraceSpec
        from retransmit_operator.render import render_daemonset
        from retransmit_operator.settings import Settings

        ds = render_daemonset("psa", "0", RetransmitTraceSpec(), Settings(namespace=ns, agent_security_mode="capabilities",
                                                                   agent_service_account="psa-agent"))
        done = kubectl(cluster, "create", "--dry-run=server", "-f", "-",
                       input=pod_from(ds["spec"]["template"], "agent", ns), check=False)
        assert done.returncode != 0 and "violates PodSecurity" in done.stderr, done.stderr
    finally:
        kubectl(cluster, "delete", "namespace", ns, "--wait=false")


def test_openshift_install_lets_only_the_agent_use_its_own_scc(cluster, openshift_scc_api):
    """A real `helm install` with openshift.enabled (then `helm uninstall`): the agents' SCC
    is stored (by a stand-in of the SCC API that checks its fields' types), and only the
    agent's account may use it; nobody gets `privileged`."""
    ns, release = unique("rtrace-ocp"), unique("ocp")
    helm(cluster, "install", release, str(CHART), "--set", "namespace.name=" + ns, "--set", "openshift.enabled=true",
         "--set", "fullnameOverride=" + release)  # no --wait: no node runs the operator in this test
    try:
        labels = json.loads(kubectl(cluster, "get", "namespace", ns, "-o", "json").stdout)["metadata"]["labels"]
        assert labels["pod-security.kubernetes.io/enforce"] == "privileged"
        def use(sa: str, scc: str) -> bool:
            return access_review(cluster, (ns, sa), "use", "security.openshift.io", "securitycontextconstraints",
                                 namespace=ns, name=scc)

        scc = json.loads(kubectl(cluster, "get", "securitycontextconstraints", release + "-agent", "-o", "json").stdout)
        assert scc["allowHostNetwork"] and scc["seLinuxContext"]["seLinuxOptions"]["type"] == "spc_t"
        assert use(release + "-agent", release + "-agent")
        assert not use(release + "-agent", "privileged")
        assert not use(release, release + "-agent")    # the operator's account
        assert not use(release + "-agent", "anyuid")
        assert not use("default", "privileged")
    finally:
        helm(cluster, "uninstall", release, "--wait", "--timeout", "120s")
    assert kubectl(cluster, "get", "clusterrole", release + "-agent-scc", check=False).returncode != 0
    assert kubectl(cluster, "get", "securitycontextconstraints", release + "-agent", check=False).returncode != 0
    gone = kubectl(cluster, "get", "namespace", ns, "-o", "jsonpath={.status.phase}", check=False)
    assert gone.returncode != 0 or gone.stdout == "Terminating"


def test_plain_manifests_apply_in_file_order_and_delete_cleanly(cluster, openshift_scc_api):
    """`kubectl apply -f manifests/ && kubectl apply -f manifests/openshift/` on a cluster
    without the namespace: files apply in name order, so 00-namespace.yaml must come first."""
    assert kubectl(cluster, "get", "namespace", "retransmit-system", check=False).returncode != 0
    files = [p for p in sorted(MANIFESTS.glob("*.yaml")) if not p.name.startswith("crd")]  # delete all but the CRDs (others use them)
    args = [a for p in files for a in ("-f", str(p))]
    try:
        kubectl(cluster, "apply", "-f", str(MANIFESTS))      # as the README says (not recursive: no samples)
        kubectl(cluster, "apply", "-f", str(MANIFESTS / "openshift"))
        deployment = json.loads(kubectl(cluster, "get", "deployment", "-n", "retransmit-system", "retransmit-operator",
                                        "-o", "json").stdout)
        assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "retransmit-operator"
        assert kubectl(cluster, "get", "validatingadmissionpolicy", "retransmit-operator-spec-guard").returncode == 0
        assert kubectl(cluster, "get", "validatingadmissionpolicy", "retransmit-operator-report-guard").returncode == 0
    finally:
        # Waits until the namespace is gone: later tests of the session may use the same names.
        kubectl(cluster, "delete", "--ignore-not-found", "-f", str(MANIFESTS / "openshift"))
        kubectl(cluster, "delete", "--ignore-not-found", "--timeout=180s", *args)
