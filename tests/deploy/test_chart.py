"""The Helm chart on its own: lint, values schema, and manifests/ rendered from it (no drift)."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from helm import render_manifests
from helm.render_manifests import CHART, helm_template, split_by_template, tool

pytestmark = pytest.mark.deploy

VARIANTS = {
    "default": [],
    "openshift": ["--set", "openshift.enabled=true"],
    "capabilities": ["--set", "agent.securityMode=capabilities"],
    "privileged": ["--set", "agent.securityMode=privileged"],
}


def objects(*args: str) -> dict[str, dict]:
    """kind/name -> object of the chart rendered with args."""
    docs = [yaml.safe_load(d) for d in split_by_template(helm_template(*args)).values()]
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def operator_env(objs: dict[str, dict]) -> dict[str, object]:
    container = objs["Deployment/retransmit-operator"]["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.mark.parametrize("variant", VARIANTS)
def test_helm_lint_is_clean(variant):
    done = subprocess.run([tool("helm"), "lint", "--strict", str(CHART), *VARIANTS[variant]],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[WARNING]" not in done.stdout and "[ERROR]" not in done.stdout, done.stdout


@pytest.mark.parametrize("setting, message", [
    (["--set", "agent.securityMode=root"], "at '/agent/securityMode': value must be one of 'auto', 'privileged', 'capabilities'"),
    (["--set", "agent.image.pullPolicy=Sometimes"], "at '/agent/image/pullPolicy': value must be one of 'Always', 'IfNotPresent', 'Never'"),
    (["--set", "operator.image.pullPolicy=Sometimes"], "at '/operator/image/pullPolicy': value must be one of"),
    (["--set", "operator.resources.limits.memory=lots"], "at '/operator/resources/limits/memory': 'lots' does not match pattern"),
    (["--set", "openshift.enabled=yes"], "at '/openshift/enabled': got string, want boolean"),
    (["--set", "agent.metricsPort=80"], "at '/agent/metricsPort': minimum"),
    (["--set", "agent.metricsPort=65437"], "at '/agent/metricsPort': maximum"),
    (["--set", "operator.image.tag=v1:2"], "at '/operator/image/tag'"),
    (["--set", "agent.image.repository=reg/agent:v1"], "at '/agent/image/repository'"),
    # The one image of earlier releases is gone: its value says so rather than being ignored.
    (["--set", "image.repository=reg/rt"], "additional properties 'image' not allowed"),
    (["--set", "agent.securityMod=capabilities"], "additional properties 'securityMod' not allowed"),
])
def test_values_schema_refuses_bad_values_with_a_clear_message(setting, message):
    done = subprocess.run([tool("helm"), "template", "x", str(CHART), *setting], capture_output=True, text=True)
    assert done.returncode != 0, f"{setting} was accepted"
    assert message in done.stderr, done.stderr


def test_manifests_are_the_chart_rendered_with_default_values():
    """manifests/ (except crd.yaml and samples/) is `make manifests` output: no drift."""
    assert render_manifests.drift() == []


def test_openshift_adds_the_agents_own_scc_and_its_use_by_the_agent_alone():
    plain, openshift = objects(), objects(*VARIANTS["openshift"])
    added = {k: v for k, v in openshift.items() if k not in plain}
    assert set(added) == {"SecurityContextConstraints/retransmit-operator-agent",
                          "ClusterRole/retransmit-operator-agent-scc", "RoleBinding/retransmit-operator-agent-scc"}
    role, binding = added["ClusterRole/retransmit-operator-agent-scc"], added["RoleBinding/retransmit-operator-agent-scc"]
    assert role["rules"] == [{"apiGroups": ["security.openshift.io"], "resources": ["securitycontextconstraints"],
                              "resourceNames": ["retransmit-operator-agent"], "verbs": ["use"]}]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "retransmit-operator-agent",
                                    "namespace": render_manifests.NAMESPACE}]
    assert all(openshift[k] == v for k, v in plain.items())


def scc_refusals(scc: dict, pod: dict) -> list[str]:
    """Why OpenShift's SCC admission would refuse `pod` under `scc` (the checks that apply to
    what the agent's pod asks for): [] when it admits it."""
    spec, problems = pod["spec"], []
    if spec.get("hostNetwork") and not scc["allowHostNetwork"]:
        problems.append("hostNetwork")
    if spec.get("hostPID") or spec.get("hostIPC"):
        problems.append("hostPID/hostIPC")
    for volume in spec.get("volumes", []):
        kind = next(k for k in volume if k != "name")
        if kind not in scc["volumes"] or (kind == "hostPath" and not scc["allowHostDirVolumePlugin"]):
            problems.append(f"volume {volume['name']} ({kind})")
    for container in spec["containers"]:
        context = container.get("securityContext", {})
        if context.get("privileged") and not scc["allowPrivilegedContainer"]:
            problems.append("privileged")
        if context.get("allowPrivilegeEscalation", True) and not scc["allowPrivilegeEscalation"]:
            problems.append("allowPrivilegeEscalation")
        added = set(context.get("capabilities", {}).get("add", []))
        if not added <= set(scc["allowedCapabilities"] or []):
            problems.append(f"capabilities {sorted(added)}")
        if scc["readOnlyRootFilesystem"] and not context.get("readOnlyRootFilesystem"):
            problems.append("writable root filesystem")
        if context.get("runAsUser") != scc["runAsUser"]["uid"]:
            problems.append("runAsUser")
        seccomp = context.get("seccompProfile", {}).get("type", "RuntimeDefault")
        wanted = {"Unconfined": "unconfined", "RuntimeDefault": "runtime/default"}[seccomp]
        if wanted not in scc["seccompProfiles"] and "*" not in scc["seccompProfiles"]:
            problems.append(f"seccomp {seccomp}")
        if container.get("ports") and spec.get("hostNetwork") and not scc["allowHostPorts"]:
            problems.append("host ports")
    return problems


def agent_pod_templates(mode: str) -> list[dict]:
    """Every agent pod template the operator renders in `mode`: in auto, the capabilities
    agents (here with one node left to a privileged agent) and that privileged agent."""
    from retransmit_core.api import RetransmitTraceSpec
    from retransmit_operator.render import render_daemonset, render_privileged_daemonset
    from retransmit_operator.settings import Settings

    settings = Settings(agent_security_mode=mode)
    spec = RetransmitTraceSpec()
    if mode != "auto":
        return [render_daemonset("t", "uid", spec, settings)["spec"]["template"]]
    needs = {"old-node": "this kernel has no CAP_BPF or CAP_PERFMON"}
    return [render_daemonset("t", "uid", spec, settings, 9464, needs)["spec"]["template"],
            render_privileged_daemonset("t", "uid", spec, settings, 9464, needs)["spec"]["template"]]


@pytest.mark.parametrize("mode", ["auto", "privileged", "capabilities"])
def test_the_agents_scc_admits_the_pods_the_operator_renders_and_nothing_more(mode):
    scc = objects(*VARIANTS["openshift"], "--set", f"agent.securityMode={mode}")[
        "SecurityContextConstraints/retransmit-operator-agent"]
    pods = agent_pod_templates(mode)
    assert len(pods) == (2 if mode == "auto" else 1)
    for pod in pods:
        assert scc_refusals(scc, pod) == []
    assert not scc["allowHostPID"] and not scc["allowHostIPC"]
    assert scc["seLinuxContext"] == {"type": "MustRunAs", "seLinuxOptions": {"type": "spc_t"}}
    if mode == "capabilities":
        # Nothing more: no privileged container, no capability beyond the agent's three.
        assert not scc["allowPrivilegedContainer"] and not scc["allowPrivilegeEscalation"]
        (privileged,) = agent_pod_templates("privileged")
        assert "privileged" in scc_refusals(scc, privileged)
    if mode == "auto":
        assert [p["spec"]["containers"][0]["securityContext"]["privileged"] for p in pods] == [False, True]


def test_operator_settings_come_from_values():
    env = operator_env(objects("--set", "agent.securityMode=capabilities",
                               "--set", "agent.image.repository=quay.io/me/rt-agent", "--set", "agent.image.tag=v9",
                               "--set", "agent.image.pullPolicy=Always",
                               "--set", "agent.resources.limits.memory=300Mi"))
    assert env["RTRACE_AGENT_SECURITY_MODE"] == "capabilities"
    assert env["RTRACE_AGENT_IMAGE"] == "quay.io/me/rt-agent:v9"
    assert env["RTRACE_AGENT_IMAGE_PULL_POLICY"] == "Always"
    assert json.loads(env["RTRACE_AGENT_RESOURCES"])["limits"]["memory"] == "300Mi"
    assert env["RTRACE_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


def test_operator_reads_the_env_the_chart_gives_it():
    """The chart <-> operator contract: the operator parses every value the chart renders."""
    from retransmit_operator.settings import Settings

    objs = objects()
    env = {k: v for k, v in operator_env(objs).items() if isinstance(v, str)}
    settings = Settings.from_env(env)
    assert settings.agent_service_account == "retransmit-operator-agent"
    assert "ServiceAccount/" + settings.agent_service_account in objs
    assert settings.agent_image == "ghcr.io/retransmit-operator/retransmit-agent:0.1.0"
    assert settings.agent_resources["limits"] == {"cpu": "1", "memory": "512Mi"}
    assert settings.metrics_port == 8080 and settings.agent_metrics_port == 9464
    # The chart's defaults are the model's (tests/unit/test_chart_values.py checks the files).
    defaults = Settings()
    assert (settings.agent_resources, settings.agent_metrics_port, settings.agent_security_mode) == (
        defaults.agent_resources, defaults.agent_metrics_port, defaults.agent_security_mode)
    # Every RTRACE_* variable the chart sets is one the operator reads.
    read = {Settings.env_name(field) for field in Settings.model_fields}
    assert {name for name in operator_env(objs) if name.startswith("RTRACE_")} <= read


def test_operator_and_agent_images_are_separate_values():
    """The Deployment runs the operator image; the agent image reaches the operator (which
    puts it in every agent DaemonSet) only through RTRACE_AGENT_IMAGE."""
    objs = objects("--set", "operator.image.repository=reg.example/rt-operator", "--set", "operator.image.tag=1.2",
                   "--set", "operator.image.pullPolicy=Never")
    container = objs["Deployment/retransmit-operator"]["spec"]["template"]["spec"]["containers"][0]
    assert (container["image"], container["imagePullPolicy"]) == ("reg.example/rt-operator:1.2", "Never")
    env = operator_env(objs)
    assert (env["RTRACE_AGENT_IMAGE"], env["RTRACE_AGENT_IMAGE_PULL_POLICY"]) == (
        "ghcr.io/retransmit-operator/retransmit-agent:0.1.0", "IfNotPresent")


def test_image_tags_may_be_digests():
    operator_digest, agent_digest = "sha256:" + "ab" * 32, "sha256:" + "cd" * 32
    objs = objects("--set", f"operator.image.tag={operator_digest}", "--set", f"agent.image.tag={agent_digest}")
    container = objs["Deployment/retransmit-operator"]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"ghcr.io/retransmit-operator/retransmit-operator@{operator_digest}"
    assert operator_env(objs)["RTRACE_AGENT_IMAGE"] == f"ghcr.io/retransmit-operator/retransmit-agent@{agent_digest}"


def test_operator_pod_is_locked_down():
    pod = objects()["Deployment/retransmit-operator"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
    assert container["command"] == ["retransmit-operator"]
    assert {"livenessProbe", "readinessProbe", "resources"} <= set(container)


def test_samples_are_valid_traces():
    from retransmit_core.api import RetransmitTraceSpec

    samples = sorted((render_manifests.MANIFESTS / "samples").glob("*.yaml"))
    assert {p.name for p in samples} == {"whole-cluster.yaml", "namespace-filtered.yaml", "port-cidr-filtered.yaml"}
    for path in samples:
        doc = yaml.safe_load(path.read_text())
        assert (doc["apiVersion"], doc["kind"]) == ("retransmit.dev/v1alpha1", "RetransmitTrace")
        RetransmitTraceSpec.model_validate(doc["spec"])


def test_chart_crd_is_the_generated_one():
    """crds/ is generated with manifests/crd.yaml from the API models (operator/crd.py)."""
    chart_crd = CHART / "crds" / "retransmittraces.yaml"
    assert chart_crd.read_text() == (render_manifests.MANIFESTS / "crd.yaml").read_text()


def test_every_value_has_a_comment_starting_with_its_key():
    """values.yaml: each setting (top level and one level down) is documented, and the
    comment starts with the dotted key, so `grep '# agent.securityMode'` finds it."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    parents: list[str] = []
    undocumented = []
    for i, line in enumerate(lines):
        stripped = line.lstrip()
        if not stripped or stripped.startswith("#") or stripped.startswith("-") or ":" not in stripped:
            continue
        depth = (len(line) - len(stripped)) // 2
        key = stripped.split(":", 1)[0]
        parents = parents[:depth] + [key]
        if depth > 1:
            continue
        dotted = ".".join(parents)
        comments = []
        j = i - 1
        while j >= 0 and lines[j].lstrip().startswith("#"):
            comments.append(lines[j].strip())
            j -= 1
        if not any(c.startswith(f"# {dotted} ") for c in comments):
            undocumented.append(dotted)
    assert undocumented == []


def _rule_set(rules: list[dict]) -> set[tuple]:
    """Rules as comparable facts: one (group, resource, verb) per granted combination."""
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]}


def test_chart_grants_the_operator_exactly_the_rules_its_code_declares():
    """retransmit_operator.rbac is what the operator's code needs (the cluster tests run the
    operator with exactly those rules); the chart must grant no more and no less."""
    from retransmit_operator import rbac

    objs = objects()
    roles = {kind_name: o for kind_name, o in objs.items() if o["kind"] in ("ClusterRole", "Role")}
    cluster = roles["ClusterRole/retransmit-operator"]["rules"]
    assert _rule_set(cluster) == _rule_set(rbac.CLUSTER_RULES)
    assert _rule_set(roles["Role/retransmit-operator"]["rules"]) == _rule_set(rbac.NAMESPACE_RULES)
    named = [r for r in roles["Role/retransmit-operator"]["rules"] if r.get("resourceNames")]
    assert named == [r for r in rbac.NAMESPACE_RULES if r.get("resourceNames")]
    assert roles["Role/retransmit-operator"]["metadata"]["namespace"] == "retransmit-system"
    assert _rule_set(roles["Role/retransmit-operator-events"]["rules"]) == _rule_set(rbac.EVENTS_RULES)
    assert roles["Role/retransmit-operator-events"]["metadata"]["namespace"] == "default"


def test_chart_grants_the_agents_exactly_the_rules_declared_and_reports_only_in_their_namespace():
    from retransmit_operator import rbac

    roles = {kind_name: o for kind_name, o in objects().items() if o["kind"] in ("ClusterRole", "Role")}
    assert _rule_set(roles["ClusterRole/retransmit-operator-agent"]["rules"]) == _rule_set(rbac.AGENT_CLUSTER_RULES)
    agent_role = roles["Role/retransmit-operator-agent"]
    assert agent_role["metadata"]["namespace"] == "retransmit-system"
    assert _rule_set(agent_role["rules"]) == _rule_set(rbac.AGENT_NAMESPACE_RULES)
