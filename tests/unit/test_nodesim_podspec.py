"""The node simulator's pod-spec expansion: what process a pod template becomes (argv, env,
working directory), as kubelet would start it, without a cluster."""

from __future__ import annotations

import pytest

from retransmit_core.api import RetransmitTraceSpec
from retransmit_core.contract import DOWNWARD_API_ENV, parse_agent_args
from retransmit_operator.render import agent_metrics_port, render_daemonset
from retransmit_operator.settings import Settings
from tests.harness.nodesim.podspec import (
    PodContext, container_command, container_env, container_port, expand, field_path, granted_capabilities,
    with_capabilities,
)

pytestmark = pytest.mark.unit
from tests.harness.nodesim.podspec import container_path

SETTINGS = Settings(namespace="rt-system", agent_image="example/agent:1", agent_service_account="agent-sa")
NODE_IPS = ["198.18.0.1", "fd00:0:1:0::1"]


def pod_of(template: dict, name: str = "rtrace-web-x7k2p", namespace: str = "rt-system",
           node: str = "node-a") -> dict:
    """A Pod as the DaemonSet controller makes it from `template` and the scheduler binds it."""
    return {"metadata": {**template["metadata"], "name": name, "namespace": namespace, "uid": "pod-uid-1"},
            "spec": {**template["spec"], "nodeName": node}}


def context(pod: dict, **overrides) -> PodContext:
    host_network = bool(pod["spec"].get("hostNetwork"))
    values = dict(pod=pod, node_name=pod["spec"].get("nodeName", "node-a"),
                  pod_ips=NODE_IPS if host_network else ["198.18.0.7", "fd00:0:1:0::7"],
                  host_ips=NODE_IPS, path="/venv/bin:/usr/bin", home="/root")
    values.update(overrides)
    return PodContext(**values)


def plain_pod(container: dict, host_network: bool = False, **spec) -> dict:
    return {"metadata": {"name": "p", "namespace": "ns", "uid": "u-1", "labels": {"app": "web"},
                         "annotations": {"note": "n1"}},
            "spec": {"nodeName": "node-b", "hostNetwork": host_network, "serviceAccountName": "sa",
                     "containers": [container], **spec}}


def lookup(objects: dict[str, dict[str, str]]):
    """A namespace's ConfigMaps or Secrets by name, as the simulator reads them."""
    def read(name: str, optional: bool) -> dict[str, str]:
        if name in objects:
            return objects[name]
        if optional:
            return {}
        raise LookupError(f"{name} not found")
    return read


# ---- the agents' DaemonSet template, as the operator renders it ----------------------------

def test_agent_pod_template_becomes_the_agent_command_with_the_contract_args():
    spec = RetransmitTraceSpec.model_validate({"duration": "20s", "filter": {"ports": [5432]}})
    template = render_daemonset("web", "trace-uid-1", spec, SETTINGS)["spec"]["template"]
    pod = pod_of(template)
    (container,) = pod["spec"]["containers"]
    env = container_env(container, context(pod))

    argv, cwd = container_command(container, env, {}, "/state/pod-dir")

    assert argv[:len(SETTINGS.agent_command)] == list(SETTINGS.agent_command)
    invocation = parse_agent_args(argv[len(SETTINGS.agent_command):])
    assert (invocation.trace, invocation.trace_uid) == ("web", "trace-uid-1")
    assert invocation.spec == spec
    assert invocation.metrics_port == agent_metrics_port("web", SETTINGS)
    assert cwd == "/state/pod-dir"


def test_agent_pod_env_resolves_every_downward_api_variable_of_the_contract():
    spec = RetransmitTraceSpec.model_validate({"duration": "20s"})
    pod = pod_of(render_daemonset("web", "trace-uid-1", spec, SETTINGS)["spec"]["template"])
    (container,) = pod["spec"]["containers"]

    env = container_env(container, context(pod, apiserver_service=("10.96.0.1", 443),
                                           kubeconfig="/state/pod-dir/kubeconfig"))

    facts = {"spec.nodeName": "node-a", "metadata.name": "rtrace-web-x7k2p",
             "metadata.namespace": "rt-system", "status.podIP": NODE_IPS[0]}
    assert {name: env[name] for name in DOWNWARD_API_ENV} == {
        name: facts[path] for name, path in DOWNWARD_API_ENV.items()}
    # hostNetwork: the pod's IP is its node's, and so is its hostname.
    assert env["HOSTNAME"] == "node-a"
    assert env["KUBERNETES_SERVICE_HOST"] == "10.96.0.1" and env["KUBERNETES_SERVICE_PORT"] == "443"
    assert env["KUBECONFIG"] == "/state/pod-dir/kubeconfig"
    assert env["PATH"] == "/venv/bin:/usr/bin" and env["HOME"] == "/root"
    assert env["PYTHONUNBUFFERED"] == "1"


def test_agent_named_metrics_port_resolves_to_the_rendered_port_for_its_probes():
    spec = RetransmitTraceSpec.model_validate({"duration": "20s"})
    (container,) = render_daemonset("web", "uid", spec, SETTINGS)["spec"]["template"]["spec"]["containers"]
    assert container_port(container, "metrics") == agent_metrics_port("web", SETTINGS)
    assert container_port(container, container["readinessProbe"]["httpGet"]["port"]) == \
        agent_metrics_port("web", SETTINGS)


# ---- command and args ---------------------------------------------------------------------

def test_args_expand_env_references_like_kubelet():
    container = {"name": "main", "command": ["sh", "-c"], "args": ["echo $(GREETING) $(MISSING) $$(GREETING)"],
                 "env": [{"name": "GREETING", "value": "hi"}], "workingDir": "/work"}
    pod = plain_pod(container)
    env = container_env(container, context(pod))
    argv, cwd = container_command(container, env, {}, "/default")
    # Known names replaced, unknown kept verbatim, $$ escapes the reference.
    assert argv == ["sh", "-c", "echo hi $(MISSING) $(GREETING)"]
    assert cwd == "/work"


def test_container_without_command_runs_its_images_entrypoint_with_its_args():
    container = {"name": "agent", "image": "localhost/retransmit-agent:dev", "args": ["check"]}
    argv, _ = container_command(container, {}, {"localhost/retransmit-agent:dev": ["retransmit-agent"]}, "/d")
    assert argv == ["retransmit-agent", "check"]


def test_container_without_command_or_known_image_is_refused_with_the_reason():
    container = {"name": "web", "image": "nginx"}
    with pytest.raises(ValueError, match=r"container web has no command and image 'nginx' has no entrypoint"):
        container_command(container, {}, {}, "/d")


def test_a_container_of_an_image_with_its_own_build_finds_that_builds_scripts_first():
    bins = {"localhost/rtrace:v0.1.0": "/tmp/v0.1.0/bin"}
    old, new = ({"name": "operator", "image": image, "command": ["retransmit-operator"]}
                for image in ("localhost/rtrace:v0.1.0", "localhost/rtrace:head"))
    assert container_path(old, "/venv/bin:/usr/bin", bins) == "/tmp/v0.1.0/bin:/venv/bin:/usr/bin"
    assert container_path(new, "/venv/bin:/usr/bin", bins) == "/venv/bin:/usr/bin"
    assert container_path({"name": "no-image"}, "/venv/bin", bins) == "/venv/bin"
    # ... and it is the container's $PATH, where its command is looked up.
    pod = plain_pod(old)
    env = container_env(old, context(pod, path=container_path(old, "/venv/bin:/usr/bin", bins)))
    assert env["PATH"] == "/tmp/v0.1.0/bin:/venv/bin:/usr/bin"


# ---- env ----------------------------------------------------------------------------------

def test_env_values_may_use_earlier_variables_in_order():
    container = {"name": "m", "command": ["x"], "env": [
        {"name": "A", "value": "1"}, {"name": "B", "value": "$(A)-$(C)"}, {"name": "C", "value": "3"}]}
    env = container_env(container, context(plain_pod(container)))
    assert env["B"] == "1-$(C)" and env["C"] == "3"


def test_field_refs_of_a_pod_in_its_own_network_namespace():
    refs = {"NAME": "metadata.name", "NS": "metadata.namespace", "UID": "metadata.uid", "NODE": "spec.nodeName",
            "SA": "spec.serviceAccountName", "IP": "status.podIP", "IPS": "status.podIPs",
            "HOST": "status.hostIP", "HOSTS": "status.hostIPs", "APP": "metadata.labels['app']",
            "NOTE": "metadata.annotations['note']", "NONE": "metadata.labels['absent']"}
    container = {"name": "m", "command": ["x"],
                 "env": [{"name": k, "valueFrom": {"fieldRef": {"fieldPath": v}}} for k, v in refs.items()]}
    pod = plain_pod(container)
    env = container_env(container, context(pod))
    assert {k: env[k] for k in refs} == {
        "NAME": "p", "NS": "ns", "UID": "u-1", "NODE": "node-b", "SA": "sa",
        "IP": "198.18.0.7", "IPS": "198.18.0.7,fd00:0:1:0::7",
        "HOST": NODE_IPS[0], "HOSTS": ",".join(NODE_IPS), "APP": "web", "NOTE": "n1", "NONE": ""}
    assert env["HOSTNAME"] == "p"
    assert "KUBERNETES_SERVICE_HOST" not in env and "KUBECONFIG" not in env


def test_pod_ip_is_empty_before_the_pod_has_a_network():
    assert field_path(plain_pod({"name": "m"}), "status.podIP", [], NODE_IPS) == ""


def test_unsupported_field_ref_names_the_path():
    with pytest.raises(ValueError, match=r"fieldRef 'status.phase' is not supported"):
        field_path(plain_pod({"name": "m"}), "status.phase", [], NODE_IPS)


def test_config_map_and_secret_references_and_env_from_with_prefix():
    container = {"name": "m", "command": ["x"],
                 "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "CM_"},
                             {"secretRef": {"name": "creds"}},
                             {"configMapRef": {"name": "absent", "optional": True}}],
                 "env": [{"name": "LEVEL", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "level"}}},
                         {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
                         {"name": "OPT", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "nope",
                                                                        "optional": True}}}]}
    ctx = context(plain_pod(container), config_maps=lookup({"settings": {"level": "debug"}}),
                  secrets=lookup({"creds": {"password": "s3cret"}}))
    env = container_env(container, ctx)
    assert env["CM_level"] == "debug" and env["password"] == "s3cret"
    assert env["LEVEL"] == "debug" and env["PW"] == "s3cret"
    assert "OPT" not in env


@pytest.mark.parametrize("ref, message", [
    ({"configMapKeyRef": {"name": "settings", "key": "missing"}}, "configmap settings has no key missing"),
    ({"secretKeyRef": {"name": "creds", "key": "missing"}}, "secret creds has no key missing"),
])
def test_a_missing_required_key_is_refused_with_the_object_and_key(ref, message):
    container = {"name": "m", "command": ["x"], "env": [{"name": "V", "valueFrom": ref}]}
    ctx = context(plain_pod(container), config_maps=lookup({"settings": {}}), secrets=lookup({"creds": {}}))
    with pytest.raises(ValueError, match=message):
        container_env(container, ctx)


def test_resource_field_refs_read_the_containers_resources():
    container = {"name": "m", "command": ["x"], "resources": {"limits": {"memory": "512Mi"}},
                 "env": [{"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory"}}},
                         {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}}]}
    env = container_env(container, context(plain_pod(container)))
    assert env["MEM"] == "512Mi" and env["CPU"] == "0"


# ---- ports --------------------------------------------------------------------------------

def test_probe_ports_by_number_or_name_and_an_unknown_name_is_refused():
    container = {"name": "m", "ports": [{"name": "http", "containerPort": 8080}]}
    assert container_port(container, 9000) == 9000
    assert container_port(container, "9001") == 9001
    assert container_port(container, "http") == 8080
    with pytest.raises(ValueError, match="container m has no port named grpc"):
        container_port(container, "grpc")


def test_expand_leaves_text_without_references_alone():
    assert expand("plain $HOME and $(", {"HOME": "x"}) == "plain $HOME and $("


@pytest.mark.parametrize("mode, withheld, granted", [
    ("capabilities", (), ["BPF", "PERFMON", "SYS_RESOURCE"]),
    ("auto", ("PERFMON",), ["BPF", "SYS_RESOURCE"]),     # a runtime that does not grant PERFMON
    ("privileged", ("PERFMON",), None),                  # privileged: everything, withheld or not
])
def test_the_simulated_runtime_grants_what_the_agents_container_adds(mode, withheld, granted):
    (container,) = render_daemonset("web", "uid-1", RetransmitTraceSpec(), Settings(agent_security_mode=mode))[
        "spec"]["template"]["spec"]["containers"]
    assert granted_capabilities(container, withheld) == granted
    assert granted_capabilities({"name": "plain"}) is None          # no securityContext: as before


def test_granted_capabilities_become_the_processes_bounding_set():
    assert with_capabilities(["agent", "cluster"], ["BPF", "PERFMON"]) == [
        "setpriv", "--bounding-set=-all,+bpf,+perfmon", "--inh-caps=-all", "--", "agent", "cluster"]
    assert with_capabilities(["agent"], None) == ["agent"]
    assert with_capabilities(["agent"], [])[1] == "--bounding-set=-all"
