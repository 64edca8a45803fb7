"""The operator's cache of its agents' DaemonSets (daemonsets.py): the watch never brings back
an older version than the operator wrote, nor a DaemonSet the operator or anyone deleted, a
relist keeps what the operator wrote after it, and once the watch has listed, a pass over a
trace reads its DaemonSets from the cache, not from the API server."""

from __future__ import annotations

import asyncio
import copy
from typing import Any, Optional

import pytest

from retransmit_core.naming import CLUSTER_AGENTS_ANNOTATION, agent_labels, daemonset_name
from retransmit_operator.daemonsets import DaemonSetCache
from retransmit_operator.slots import port_of
from tests.unit.operator_fakes import NS, FakeKube, reconciler, trace

pytestmark = pytest.mark.unit


def daemonset(trace: str, version: int, uid: str = "ds-uid-1", count: Optional[int] = None) -> dict[str, Any]:
    annotations = {} if count is None else {CLUSTER_AGENTS_ANNOTATION: str(count)}
    return {"apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": daemonset_name(trace), "namespace": NS, "uid": uid,
                         "resourceVersion": str(version), "labels": agent_labels(trace), "annotations": annotations}}


def version_of(cache: DaemonSetCache, trace: str) -> Optional[str]:
    found = cache.get(daemonset_name(trace))
    return None if found is None else found["metadata"]["resourceVersion"]


def test_a_watch_event_older_than_the_operators_write_does_not_replace_it():
    cache = DaemonSetCache()
    cache.replace([daemonset("web", 10, count=100)], "10")
    cache.record(daemonset("web", 12, count=300))       # the operator annotated it
    cache.observe(daemonset("web", 11, count=200))      # the watch, behind, delivers an earlier change
    assert version_of(cache, "web") == "12"
    cache.observe(daemonset("web", 13, count=300))      # ... and then a later one
    assert version_of(cache, "web") == "13"
    cache.record(daemonset("web", 12, count=300))       # a write's response that a watch event overtook
    assert version_of(cache, "web") == "13"


def test_a_daemonset_deleted_on_the_watch_leaves_the_cache():
    cache = DaemonSetCache()
    cache.replace([daemonset("web", 10), daemonset("shop", 11, uid="ds-uid-2")], "11")
    cache.observe(daemonset("web", 12), deleted=True)
    assert cache.get(daemonset_name("web")) is None
    assert [ds["metadata"]["name"] for ds in cache.all()] == [daemonset_name("shop")]


def test_a_daemonset_the_operator_deleted_does_not_come_back_with_a_late_event():
    cache = DaemonSetCache()
    cache.replace([daemonset("web", 10)], "10")
    cache.forget(daemonset_name("web"))
    cache.observe(daemonset("web", 11))     # changed (its status, say) before the delete reached it
    assert cache.get(daemonset_name("web")) is None
    cache.replace([daemonset("web", 11)], "11")   # a list served before the delete
    assert cache.get(daemonset_name("web")) is None
    cache.observe(daemonset("web", 12), deleted=True)
    cache.observe(daemonset("web", 13, uid="ds-uid-new"))   # the trace's next DaemonSet
    assert cache.get(daemonset_name("web"))["metadata"]["uid"] == "ds-uid-new"


def test_a_relist_keeps_what_the_operator_wrote_after_it_and_drops_what_went_before():
    cache = DaemonSetCache()
    cache.replace([], "5")
    cache.record(daemonset("web", 25))      # created after the list below was served
    cache.record(daemonset("shop", 15, uid="ds-uid-2"))   # deleted by someone before it
    cache.replace([], "20")
    assert version_of(cache, "web") == "25"
    assert cache.get(daemonset_name("shop")) is None


# ------------------------------------------------------------ a pass over a trace


def test_once_the_watch_listed_a_pass_reads_no_daemonset_from_the_api_server():
    kube = FakeKube()
    r = reconciler(kube, trace("web", "uid-1"), trace("shop", "uid-2"))
    r.daemonsets.replace([], "1")
    asyncio.run(r.sync_once())      # creates both DaemonSets (and writes the agent count on them)
    asyncio.run(r.sync_once())      # they exist: nothing to write but the status
    assert kube.calls.get("get_daemonset", 0) == 0
    assert kube.calls.get("list_agent_daemonsets", 0) == 0
    # Each applied and annotated once: the second pass read what the first wrote.
    assert kube.calls["apply_daemonset"] == 2
    assert kube.calls["annotate_daemonset"] == 2
    assert {ds["metadata"]["annotations"][CLUSTER_AGENTS_ANNOTATION] for ds in r.daemonsets.all()} == {"4"}
    # The second trace's slot came from the cache too: the two have different ports.
    assert port_of(r.daemonsets.get(daemonset_name("web"))) != port_of(r.daemonsets.get(daemonset_name("shop")))


def test_until_the_watch_listed_a_pass_asks_the_api_server():
    kube = FakeKube()
    r = reconciler(kube, trace("web", "uid-1"))
    asyncio.run(r.sync_once())
    assert kube.calls["get_daemonset"] == 1
    assert kube.calls["list_agent_daemonsets"] == 1
    asyncio.run(r.sync_once())
    assert kube.calls["get_daemonset"] == 2
    assert kube.calls["apply_daemonset"] == 1   # the GET found what the first pass created


def test_the_next_trace_sees_the_slot_a_daemonset_just_created_takes():
    kube = FakeKube()
    shop, web = trace("shop", "uid-1"), trace("web", "uid-2")
    r = reconciler(kube, shop, web, max_running_traces=1)
    r.daemonsets.replace([], "1")
    asyncio.run(r.reconcile(shop, trigger="create"))   # the older by name, equally old by time
    status = asyncio.run(r.reconcile(web, trigger="create"))
    assert list(kube.daemonsets) == [daemonset_name("shop")]
    assert "1 trace(s) run already (shop)" in next(c.message for c in status.conditions if c.type == "Ready")


def test_a_daemonset_the_operator_deleted_leaves_the_cache_at_once():
    kube = FakeKube()
    web = trace("web", "uid-1")
    r = reconciler(kube, web)
    r.daemonsets.replace([], "1")
    asyncio.run(r.sync_once())
    assert r.daemonsets.get(daemonset_name("web")) is not None
    changed = {**web, "metadata": {**web["metadata"], "generation": 2, "resourceVersion": "500"},
               "spec": {"durationSeconds": 600}}    # not a field: the spec is invalid now
    kube.traces["web"] = copy.deepcopy(changed)
    r.observe_trace("MODIFIED", changed)
    asyncio.run(r.sync_once())
    assert kube.calls["delete_daemonset"] >= 1
    assert r.daemonsets.get(daemonset_name("web")) is None


def test_a_new_leadership_term_reads_from_the_api_server_until_its_watch_lists():
    kube = FakeKube()
    r = reconciler(kube, trace("web", "uid-1"))
    r.daemonsets.replace([], "1")
    asyncio.run(r.sync_once())
    assert kube.calls.get("get_daemonset", 0) == 0
    r.daemonsets.reset()
    asyncio.run(r.sync_once())
    assert kube.calls["get_daemonset"] == 1
