"""The agents' DaemonSet, rendered without a cluster: what the pods get is the contract."""

from __future__ import annotations

import pytest

from retransmit_core.api import RetransmitTraceSpec
from retransmit_core.contract import DOWNWARD_API_ENV, parse_agent_args
from retransmit_core.naming import SPEC_HASH_ANNOTATION
from retransmit_operator.render import (
    agent_metrics_port, render_daemonset,
)
from retransmit_operator.settings import Settings

pytestmark = pytest.mark.unit

SETTINGS = Settings(namespace="rt-system", agent_image="example/agent:1", agent_service_account="agent-sa")
SPEC = RetransmitTraceSpec.model_validate({
    "duration": "20s",
    "nodeSelector": {"pool": "db"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "db", "effect": "NoSchedule"}],
    "filter": {"ports": [5432]},
})


def _ds(spec=SPEC, settings=SETTINGS, name="web"):
    return render_daemonset(name, "uid-1", spec, settings)


def _container(ds):
    (container,) = ds["spec"]["template"]["spec"]["containers"]
    return container


def test_name_namespace_and_controller_owner_reference():
    ds = _ds()
    assert ds["metadata"]["name"] == "rtrace-web" and ds["metadata"]["namespace"] == "rt-system"
    (owner,) = ds["metadata"]["ownerReferences"]
    assert owner == {"apiVersion": "retransmit.dev/v1alpha1", "kind": "RetransmitTrace", "name": "web",
                     "uid": "uid-1", "controller": True, "blockOwnerDeletion": True}


def test_recommended_labels_and_selector_matches_template():
    ds = _ds()
    labels = ds["metadata"]["labels"]
    for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component",
                "app.kubernetes.io/managed-by"):
        assert labels[key]
    assert labels["app.kubernetes.io/component"] == "agent" and labels["retransmit.dev/trace"] == "web"
    selector = ds["spec"]["selector"]["matchLabels"]
    template_labels = ds["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= template_labels.items()
    assert _ds(name="other")["spec"]["selector"]["matchLabels"] != selector


def test_pod_runs_on_host_network_on_selected_linux_nodes_with_tolerations():
    pod = _ds()["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["nodeSelector"] == {"pool": "db", "kubernetes.io/os": "linux"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "db", "effect": "NoSchedule"}]
    assert pod["serviceAccountName"] == "agent-sa"
    assert pod["terminationGracePeriodSeconds"] >= 10


def test_args_carry_the_spec_and_parse_back_with_the_agent_contract():
    c = _container(_ds())
    assert c["image"] == "example/agent:1" and c["command"] == ["retransmit-agent"]
    invocation = parse_agent_args(c["args"])
    assert invocation.trace == "web" and invocation.spec == SPEC
    assert invocation.metrics_port == agent_metrics_port("web", SETTINGS)
    assert invocation.trace_uid == "uid-1"


def test_downward_api_env_is_the_contract_env():
    env = {e["name"]: e for e in _container(_ds())["env"]}
    for name, path in DOWNWARD_API_ENV.items():
        assert env[name]["valueFrom"]["fieldRef"]["fieldPath"] == path
    # Exactly the contract's: nothing rendered that the agent does not read (RTRACE_POD_NAME was).
    assert {name for name, e in env.items() if "valueFrom" in e} == set(DOWNWARD_API_ENV)
    assert "RTRACE_POD_NAME" not in env


def test_host_paths_are_mounted_read_only_without_creating_anything():
    ds = _ds()
    volumes = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in _container(ds)["volumeMounts"]}
    for path in ("/sys/kernel/debug", "/sys/kernel/tracing", "/sys/kernel/btf", "/lib/modules", "/usr/src"):
        mount = mounts[path]
        assert mount["readOnly"] is True
        assert volumes[mount["name"]]["hostPath"] == {"path": path, "type": ""}


def test_security_modes():
    privileged = _container(_ds(settings=Settings(agent_security_mode="privileged")))["securityContext"]
    assert privileged["privileged"] is True
    caps = _container(_ds(settings=Settings(agent_security_mode="capabilities")))["securityContext"]
    assert caps["privileged"] is False and caps["allowPrivilegeEscalation"] is False
    assert caps["capabilities"] == {"drop": ["ALL"], "add": ["BPF", "PERFMON", "SYS_RESOURCE"]}
    assert "SYS_ADMIN" not in caps["capabilities"]["add"]
    # The default, auto, starts every node's agent with the capabilities context.
    assert Settings().agent_security_mode == "auto"
    assert _container(_ds(settings=Settings()))["securityContext"] == caps


def test_probes_use_the_agents_metrics_port_paths():
    c = _container(_ds())
    port = agent_metrics_port("web", SETTINGS)
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port, "scheme": "HTTP"}
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez" and c["livenessProbe"]["httpGet"]["port"] == port
    assert c["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]


def test_metrics_port_is_stable_per_trace_and_in_range():
    ports = {agent_metrics_port(f"trace-{i}", SETTINGS) for i in range(200)}
    assert all(SETTINGS.agent_metrics_port <= p < SETTINGS.agent_metrics_port + 100 for p in ports)
    assert len(ports) > 50
    assert agent_metrics_port("web", SETTINGS) == agent_metrics_port("web", SETTINGS)


def test_spec_hash_rolls_pods_on_spec_change_only():
    a, b = _ds(), _ds()
    assert a == b
    h = a["spec"]["template"]["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
    assert a["metadata"]["annotations"][SPEC_HASH_ANNOTATION] == h
    changed = SPEC.model_copy(update={"top_flows": 3})
    assert _ds(spec=changed)["spec"]["template"]["metadata"]["annotations"][SPEC_HASH_ANNOTATION] != h
    image = Settings(namespace="rt-system", agent_image="example/agent:2", agent_service_account="agent-sa")
    assert _ds(settings=image)["spec"]["template"]["metadata"]["annotations"][SPEC_HASH_ANNOTATION] != h


def test_rolling_update_strategy():
    assert _ds()["spec"]["updateStrategy"]["type"] == "RollingUpdate"


def test_a_selector_reads_as_people_write_it():
    from retransmit_operator.render import selector_text

    assert selector_text({"kubernetes.io/os": "linux", "kubernetes.io/hostname": "node-b"}) == \
        "kubernetes.io/hostname=node-b, kubernetes.io/os=linux"
