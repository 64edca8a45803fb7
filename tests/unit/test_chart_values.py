"""The chart's values.yaml and values.schema.json against the operator's settings model.

The model (operator/settings.py) holds each default, bound and choice once; where the chart
repeats one (it cannot import Python), it must equal the model's: drift fails here, without
helm or a cluster. The chart passes each of these values to the operator as the variable
named in CHART_VALUES (tests/deploy/test_chart.py renders that).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from retransmit_core.contract import METRICS_PORT_SPAN
from retransmit_operator.settings import LOG_LEVELS, Settings

pytestmark = pytest.mark.unit

CHART = Path(__file__).resolve().parents[2] / "helm" / "retransmit-operator"
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
MODEL = Settings.model_json_schema(by_alias=False)["properties"]

# chart value -> the Settings field the operator reads it into
CHART_VALUES = {
    "agent.metricsPort": "agent_metrics_port",
    "agent.securityMode": "agent_security_mode",
    "agent.resources": "agent_resources",
    "agent.image.pullPolicy": "agent_image_pull_policy",
    "operator.metricsPort": "metrics_port",
    "operator.logLevel": "log_level",
    "namespace.name": "namespace",
    "agent.tolerations": "agent_tolerations",
    "agent.nodeSelector": "agent_node_selector",
    "agent.priorityClassName": "agent_priority_class_name",
    "maxRunningTraces": "max_running_traces",
}


def value(dotted: str):
    node = VALUES
    for key in dotted.split("."):
        node = node[key]
    return node


def schema_of(dotted: str) -> dict:
    node = SCHEMA
    for key in dotted.split("."):
        node = node["properties"][key]
        if "$ref" in node:          # "#/definitions/<name>"
            node = SCHEMA["definitions"][node["$ref"].rsplit("/", 1)[1]]
    return node


@pytest.mark.parametrize("chart_value", CHART_VALUES)
def test_chart_default_is_the_settings_default(chart_value):
    field = CHART_VALUES[chart_value]
    default = getattr(Settings(), field)
    chart = value(chart_value)
    # The chart writes the log level in lower case; the template upper-cases it. An empty
    # string renders an empty variable, which the operator reads as unset.
    chart = chart.upper() if field == "log_level" else None if chart == "" else chart
    assert chart == (list(default) if isinstance(default, tuple) else default)


def test_agent_resources_default_has_a_cpu_limit_in_both():
    """The conflict this file was written for: the model had no CPU limit, the chart one core."""
    assert Settings().agent_resources["limits"]["cpu"] == value("agent.resources")["limits"]["cpu"] == "1"


def test_agent_metrics_port_bounds_are_the_settings_bounds():
    chart, model = schema_of("agent.metricsPort"), MODEL["agent_metrics_port"]
    assert (chart["type"], chart["minimum"], chart["maximum"]) == (model["type"], model["minimum"], model["maximum"])


def test_max_running_traces_bounds_are_the_settings_bounds():
    chart, model = schema_of("maxRunningTraces"), MODEL["max_running_traces"]
    assert (chart["type"], chart["minimum"], chart["maximum"]) == (model["type"], model["minimum"], model["maximum"])
    assert model["maximum"] == METRICS_PORT_SPAN   # a running trace holds one of the span's ports


def test_highest_agent_base_port_leaves_every_trace_a_real_port():
    highest = MODEL["agent_metrics_port"]["maximum"]
    assert highest + METRICS_PORT_SPAN - 1 == 65535


def test_operator_metrics_port_bounds_are_inside_the_settings_bounds():
    """The chart's minimum is stricter on purpose: its Deployment probes that port, so 0
    (which disables the server for the operator) and root-only ports would break the pod."""
    chart, model = schema_of("operator.metricsPort"), MODEL["metrics_port"]
    assert chart["type"] == model["type"] and chart["maximum"] == model["maximum"]
    assert model["minimum"] <= chart["minimum"] == 1024


@pytest.mark.parametrize("chart_value", ["agent.securityMode", "agent.image.pullPolicy"])
def test_chart_choices_are_the_settings_choices(chart_value):
    assert schema_of(chart_value)["enum"] == MODEL[CHART_VALUES[chart_value]]["enum"]


def test_chart_log_levels_are_the_settings_log_levels():
    assert [level.upper() for level in schema_of("operator.logLevel")["enum"]] == list(LOG_LEVELS)
    for level in LOG_LEVELS:
        assert Settings(log_level=level.lower()).log_level == level
