"""The operator's environment contract with the Helm chart."""

from __future__ import annotations

import pytest

from retransmit_operator.settings import AGENT_METRICS_PORT_MAX, Settings, SettingsError

pytestmark = pytest.mark.unit


def test_defaults_without_environment():
    s = Settings.from_env({})
    assert (s.namespace, s.agent_service_account, s.agent_security_mode) == ("retransmit-system", "retransmit-agent", "auto")
    assert s.agent_command == ("retransmit-agent",)
    assert s == Settings()


def test_every_variable_is_read():
    s = Settings.from_env({
        "RTRACE_NAMESPACE": "ops", "RTRACE_AGENT_IMAGE": "reg/agent:2", "RTRACE_AGENT_IMAGE_PULL_POLICY": "Always",
        "RTRACE_AGENT_SERVICE_ACCOUNT": "sa", "RTRACE_AGENT_SECURITY_MODE": "capabilities",
        "RTRACE_AGENT_RESOURCES": '{"limits": {"memory": "1Gi"}}',
        "RTRACE_METRICS_PORT": "0", "RTRACE_AGENT_COMMAND": "/venv/bin/python -m retransmit_agent",
        "RTRACE_AGENT_METRICS_PORT": "19000", "RTRACE_SYNC_INTERVAL": "500ms", "RTRACE_LOG_LEVEL": "debug",
        "KUBECONFIG": "/k",
        "RTRACE_AGENT_TOLERATIONS": '[{"key": "dedicated", "operator": "Exists"}]',
        "RTRACE_AGENT_NODE_SELECTOR": '{"pool": "blue"}', "RTRACE_AGENT_PRIORITY_CLASS_NAME": "system-node-critical",
        "RTRACE_MAX_RUNNING_TRACES": "3",
    })
    assert s.agent_tolerations == ({"key": "dedicated", "operator": "Exists"},)
    assert s.agent_node_selector == {"pool": "blue"} and s.agent_priority_class_name == "system-node-critical"
    assert s.max_running_traces == 3
    assert (s.namespace, s.agent_image, s.agent_image_pull_policy, s.agent_service_account) == ("ops", "reg/agent:2", "Always", "sa")
    assert s.agent_security_mode == "capabilities" and s.agent_resources == {"limits": {"memory": "1Gi"}}
    assert s.metrics_port == 0 and s.agent_metrics_port == 19000
    assert s.agent_command == ("/venv/bin/python", "-m", "retransmit_agent")
    assert s.sync_interval == 0.5 and s.kubeconfig == "/k" and s.log_level == "DEBUG"
    assert {Settings.env_name(field) for field in Settings.model_fields} == {
        "RTRACE_NAMESPACE", "RTRACE_AGENT_IMAGE", "RTRACE_AGENT_IMAGE_PULL_POLICY", "RTRACE_AGENT_SERVICE_ACCOUNT",
        "RTRACE_AGENT_SECURITY_MODE", "RTRACE_AGENT_RESOURCES", "RTRACE_METRICS_PORT", "RTRACE_AGENT_COMMAND",
        "RTRACE_AGENT_METRICS_PORT", "RTRACE_SYNC_INTERVAL", "RTRACE_LOG_LEVEL", "KUBECONFIG",
        "RTRACE_AGENT_TOLERATIONS", "RTRACE_AGENT_NODE_SELECTOR", "RTRACE_AGENT_PRIORITY_CLASS_NAME",
        "RTRACE_MAX_RUNNING_TRACES"}


def test_empty_variables_mean_the_default_and_unrelated_ones_are_ignored():
    """Kubernetes renders an optional value left empty as ""; RTRACE_CACHE belongs to the tests."""
    s = Settings.from_env({"RTRACE_NAMESPACE": "", "RTRACE_AGENT_COMMAND": "", "RTRACE_METRICS_PORT": "",
                           "RTRACE_CACHE": "/tmp/cache", "HOME": "/root"})
    assert s == Settings()


def test_constructing_settings_does_not_read_the_environment(monkeypatch):
    """Tests and the embedded operator inject settings; a shell's RTRACE_* must not leak in."""
    monkeypatch.setenv("RTRACE_NAMESPACE", "from-the-shell")
    monkeypatch.setenv("KUBECONFIG", "/from/the/shell")
    assert Settings().namespace == "retransmit-system" and Settings().kubeconfig is None
    assert Settings.from_env().namespace == "from-the-shell"


def test_overrides_win_over_the_environment():
    s = Settings.from_env({"RTRACE_METRICS_PORT": "9000", "RTRACE_LOG_LEVEL": "ERROR"}, metrics_port=0, log_level="debug")
    assert (s.metrics_port, s.log_level) == (0, "DEBUG")


def test_agent_metrics_port_accepts_the_highest_base_that_fits_every_trace():
    assert Settings.from_env({"RTRACE_AGENT_METRICS_PORT": str(AGENT_METRICS_PORT_MAX)}).agent_metrics_port == 65436


@pytest.mark.parametrize("env, named", [
    ({"RTRACE_AGENT_SECURITY_MODE": "root"}, "RTRACE_AGENT_SECURITY_MODE"),
    ({"RTRACE_AGENT_RESOURCES": "{cpu"}, "RTRACE_AGENT_RESOURCES"),
    ({"RTRACE_AGENT_RESOURCES": '{"cpu": 1}'}, "RTRACE_AGENT_RESOURCES"),
    ({"RTRACE_METRICS_PORT": "http"}, "RTRACE_METRICS_PORT"),
    ({"RTRACE_AGENT_IMAGE_PULL_POLICY": "Sometimes"}, "RTRACE_AGENT_IMAGE_PULL_POLICY"),
    ({"RTRACE_SYNC_INTERVAL": "fast"}, "RTRACE_SYNC_INTERVAL"),
])
def test_bad_values_name_the_variable(env, named):
    with pytest.raises(SettingsError, match=named):
        Settings.from_env(env)


@pytest.mark.parametrize("env, message", [
    ({"RTRACE_AGENT_SECURITY_MODE": "root"},
     "RTRACE_AGENT_SECURITY_MODE='root': use one of auto, privileged, capabilities"),
    ({"RTRACE_AGENT_IMAGE_PULL_POLICY": "Sometimes"},
     "RTRACE_AGENT_IMAGE_PULL_POLICY='Sometimes': use one of Always, IfNotPresent, Never"),
    ({"RTRACE_METRICS_PORT": "http"}, "RTRACE_METRICS_PORT='http' is not an integer"),
    ({"RTRACE_METRICS_PORT": "70000"}, "RTRACE_METRICS_PORT=70000 is out of range: use 0-65535"),
    ({"RTRACE_AGENT_METRICS_PORT": "80"}, "RTRACE_AGENT_METRICS_PORT=80 is out of range: use 1024-65436"),
    ({"RTRACE_AGENT_METRICS_PORT": "65437"}, "RTRACE_AGENT_METRICS_PORT=65437 is out of range: use 1024-65436"),
    ({"RTRACE_AGENT_RESOURCES": "{cpu"}, "RTRACE_AGENT_RESOURCES='{cpu': not JSON (Expecting property name"),
    ({"RTRACE_AGENT_RESOURCES": '{"cpu": 1}'},
     "RTRACE_AGENT_RESOURCES='{\"cpu\": 1}': must be an object with requests and/or limits, e.g. "
     "'{\"requests\":{\"cpu\":\"50m\",\"memory\":\"128Mi\"}}'"),
    ({"RTRACE_AGENT_RESOURCES": "[]"}, "RTRACE_AGENT_RESOURCES='[]': must be an object with requests and/or limits"),
    ({"RTRACE_SYNC_INTERVAL": "fast"},
     "RTRACE_SYNC_INTERVAL: 'fast' is not a duration: use a number and a unit (ms, s, m, h), e.g. '90s' or '1m30s'"),
    ({"RTRACE_SYNC_INTERVAL": "50ms"}, "RTRACE_SYNC_INTERVAL='50ms': below 100ms: use e.g. '2s'"),
    ({"RTRACE_LOG_LEVEL": "loud"}, "RTRACE_LOG_LEVEL='loud': use DEBUG, INFO, WARNING or ERROR"),
    ({"RTRACE_AGENT_COMMAND": "   "}, "RTRACE_AGENT_COMMAND='   ': no command: give one, e.g. 'retransmit-agent'"),
    ({"RTRACE_AGENT_COMMAND": "'unclosed"}, "RTRACE_AGENT_COMMAND=\"'unclosed\": not shell words (No closing quotation)"),
])
def test_refusals_name_the_variable_the_value_and_the_fix(env, message):
    with pytest.raises(SettingsError) as refused:
        Settings.from_env(env)
    assert str(refused.value).startswith(message), str(refused.value)


def test_every_bad_variable_is_named_at_once():
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({"RTRACE_METRICS_PORT": "1.5", "RTRACE_LOG_LEVEL": "loud"})
    assert str(refused.value) == ("RTRACE_METRICS_PORT='1.5' is not an integer; "
                                  "RTRACE_LOG_LEVEL='loud': use DEBUG, INFO, WARNING or ERROR")


def test_a_bad_override_is_named_as_the_setting_not_the_variable():
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({}, metrics_port=99999)
    assert str(refused.value) == "metrics_port=99999 is out of range: use 0-65535"


@pytest.mark.parametrize("variable, value, message", [
    ("RTRACE_AGENT_TOLERATIONS", "[{\"operator\": \"Sometimes\"}]",
     "RTRACE_AGENT_TOLERATIONS='[{\"operator\": \"Sometimes\"}]': [0].operator: should be Exists or Equal"),
    ("RTRACE_AGENT_TOLERATIONS", "{}", "must be a list of tolerations, e.g. '[{\"operator\":\"Exists\"}]'"),
    ("RTRACE_AGENT_NODE_SELECTOR", "[1]", "must be an object of label keys and values, e.g. '{\"pool\":\"blue\"}'"),
    ("RTRACE_MAX_RUNNING_TRACES", "500", "RTRACE_MAX_RUNNING_TRACES=500 is out of range: use 1-100"),
])
def test_agent_placement_and_trace_limit_variables_refuse_bad_values_by_name(variable, value, message):
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({variable: value})
    assert message in str(refused.value)

