"""`kubectl retransmit` in a cluster without the RetransmitTrace CRD: exit 4 and the fix.

A module of its own, after test_plugin.py: it deletes the CRD for a moment, which must not
happen while an operator (kopf watches the resource) or another test uses it.
"""

from __future__ import annotations

import kubernetes
import pytest

from retransmit_core.api import GROUP, PLURAL
from retransmit_plugin.main import EXIT_NO_CRD
from tests.harness.controlplane import wait_gone, wait_until
from tests.harness.tracecluster import one_line, plugin

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]


def test_without_the_crd_the_plugin_says_to_install_it(control_plane, installed, objects):
    """The trace CRD goes (and every trace with it), then comes back. No operator runs in this
    module: kopf stops when the resource it watches disappears."""
    ext = kubernetes.client.ApiextensionsV1Api(objects.api_client)
    crd_name = f"{PLURAL}.{GROUP}"
    saved = ext.read_custom_resource_definition(crd_name)
    ext.delete_custom_resource_definition(crd_name)
    try:
        wait_gone(lambda: ext.read_custom_resource_definition(crd_name), "the trace CRD deleted", timeout=120)
        # discovery drops the group a moment after the CRD goes
        wait_until(lambda: plugin(control_plane, "show", "x").returncode == EXIT_NO_CRD,
                   "the plugin to see the CRD gone", timeout=60, interval=1)
        done = plugin(control_plane, "show", "x")
        assert "helm install" in one_line(done)
    finally:
        body = kubernetes.client.ApiClient().sanitize_for_serialization(saved)
        for key in ("resourceVersion", "uid", "creationTimestamp", "managedFields", "generation"):
            body["metadata"].pop(key, None)
        body.pop("status", None)
        ext.create_custom_resource_definition(body)
        wait_until(lambda: any(c.type == "Established" and c.status == "True"
                               for c in ext.read_custom_resource_definition(crd_name).status.conditions or []),
                   "the trace CRD back", timeout=120)
