"""The pure readers the reconciler uses to read what the API server says (objects.py)."""

from __future__ import annotations

import pytest

from retransmit_core.schedule import desired_nodes
from retransmit_operator.objects import newer, operator_status

pytestmark = pytest.mark.unit


def test_desired_nodes_only_once_the_controller_saw_the_current_generation():
    assert desired_nodes(None) is None
    ds = {"metadata": {"generation": 2}, "status": {"observedGeneration": 1, "desiredNumberScheduled": 5}}
    assert desired_nodes(ds) is None
    ds["status"]["observedGeneration"] = 2
    assert desired_nodes(ds) == 5
    assert desired_nodes({"metadata": {"generation": 1}, "status": {"observedGeneration": 1}}) == 0


def test_operator_status_reads_only_operator_fields_and_tolerates_junk():
    assert operator_status({}) is None
    assert operator_status({"nodes": [{"node": "a"}]}) is None
    s = operator_status({"phase": "Running", "observedGeneration": 3, "nodes": [{"node": "a"}]})
    assert s.phase == "Running" and s.observed_generation == 3
    assert operator_status({"phase": "Sideways"}) is None


def test_newer_compares_resource_versions_of_the_same_object_only():
    a = {"metadata": {"uid": "u", "resourceVersion": "10"}}
    b = {"metadata": {"uid": "u", "resourceVersion": "9"}}
    assert newer(a, b) and not newer(b, a)
    assert not newer(a, {"metadata": {"uid": "other", "resourceVersion": "1"}})
    assert not newer({"metadata": {"uid": "u", "resourceVersion": "x"}}, b)


def test_api_failure_is_permanent_for_client_errors_but_conflicts_and_throttling():
    from kubernetes.client.exceptions import ApiException

    from retransmit_operator.kube import _failure

    e = ApiException(status=422, reason="Unprocessable Entity")
    e.body = '{"message": "DaemonSet.apps \\"rtrace-x\\" is invalid: spec.template.spec.tolerations[0].key: Invalid value"}'
    failure = _failure("apply daemonset", e)
    assert failure.permanent and "tolerations[0].key" in failure.message and str(failure).startswith("apply daemonset failed (HTTP 422 Unprocessable Entity): ")
    for status in (409, 429, 500, 503):
        assert not _failure("x", ApiException(status=status, reason="r")).permanent
    assert _failure("x", ApiException(status=403, reason="Forbidden")).permanent
