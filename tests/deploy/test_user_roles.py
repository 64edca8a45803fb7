"""The ClusterRoles for people, on a real API server with the chart installed: the built-in
`view` role (by aggregation) reads traces and node reports, so `kubectl get rtreport` and
`kubectl retransmit check` work for viewers; creating a trace (privileged agents on nodes)
is not aggregated into `edit` unless rbac.aggregateEditor says so."""

from __future__ import annotations

import pytest

from tests.deploy.kube import CHART, helm, install_crd, kubectl, unique
from tests.harness.controlplane import wait_until

pytestmark = pytest.mark.deploy


@pytest.fixture(scope="module")
def cluster(control_plane):
    install_crd(control_plane)
    return control_plane


def can(cluster, user: str, verb: str, resource: str, namespace: str | None = None) -> bool:
    args = ["auth", "can-i", verb, resource, "--as", user]
    args += ["-n", namespace] if namespace else ["--all-namespaces"]
    return kubectl(cluster, *args, check=False).stdout.strip() == "yes"


def bind(cluster, user: str, role: str) -> str:
    name = unique("rtrace-user")
    kubectl(cluster, "create", "clusterrolebinding", name, f"--clusterrole={role}", f"--user={user}")
    return name


@pytest.mark.parametrize("aggregate_editor", [False, True])
def test_view_reads_traces_and_reports_and_edit_creates_traces_only_when_asked(cluster, aggregate_editor):
    ns, release = unique("rtrace-roles"), unique("roles")
    helm(cluster, "install", release, str(CHART), "--set", "namespace.name=" + ns, "--set", "fullnameOverride=" + release,
         "--set", f"rbac.aggregateEditor={str(aggregate_editor).lower()}")
    viewer, editor = unique("viewer"), unique("editor")
    bindings = [bind(cluster, viewer, "view"), bind(cluster, editor, "edit")]
    try:
        # The controller-manager aggregates: wait until `view` and `edit` carry the viewer's
        # rules (then `edit` has been rebuilt since the chart's roles exist).
        for user in (viewer, editor):
            wait_until(lambda: can(cluster, user, "get", "retransmitnodereports.retransmit.dev", ns),
                       f"{user}: the viewer role aggregated", timeout=60)
            assert can(cluster, user, "watch", "retransmittraces.retransmit.dev")
        assert not can(cluster, viewer, "create", "retransmittraces.retransmit.dev")
        if aggregate_editor:
            wait_until(lambda: can(cluster, editor, "create", "retransmittraces.retransmit.dev"),
                       "the editor role aggregated into edit", timeout=60)
        else:
            assert not can(cluster, editor, "create", "retransmittraces.retransmit.dev")
    finally:
        for name in bindings:
            kubectl(cluster, "delete", "clusterrolebinding", name)
        helm(cluster, "uninstall", release, "--wait", "--timeout", "120s")
