"""The operator's environment contract with the Helm chart."""

from __future__ import annotations

import pytest

from retransmit_operator.settings import Settings, SettingsError

pytestmark = pytest.mark.unit


def test_defaults_without_environment():
    s = Settings.from_env({})
    assert (s.namespace, s.agent_service_account, s.agent_security_mode) == ("retransmit-system", "retransmit-agent", "privileged")
    assert s.agent_command == ("retransmit-agent",)


def test_every_variable_is_read():
    s = Settings.from_env({
        "RTRACE_NAMESPACE": "ops", "RTRACE_AGENT_IMAGE": "reg/agent:2", "RTRACE_AGENT_IMAGE_PULL_POLICY": "Always",
        "RTRACE_AGENT_SERVICE_ACCOUNT": "sa", "RTRACE_AGENT_SECURITY_MODE": "capabilities",
        "RTRACE_AGENT_RESOURCES": '{"limits": {"memory": "1Gi"}}',
        "RTRACE_METRICS_PORT": "0", "RTRACE_AGENT_COMMAND": "/venv/bin/python -m retransmit_agent",
        "RTRACE_AGENT_METRICS_PORT": "19000", "RTRACE_SYNC_INTERVAL": "500ms", "KUBECONFIG": "/k",
    })
    assert (s.namespace, s.agent_image, s.agent_image_pull_policy, s.agent_service_account) == ("ops", "reg/agent:2", "Always", "sa")
    assert s.agent_security_mode == "capabilities" and s.agent_resources == {"limits": {"memory": "1Gi"}}
    assert s.metrics_port == 0 and s.agent_metrics_port == 19000
    assert s.agent_command == ("/venv/bin/python", "-m", "retransmit_agent")
    assert s.sync_interval == 0.5 and s.kubeconfig == "/k"


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
