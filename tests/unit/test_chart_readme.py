"""The chart's README is generated from the comments in values.yaml (helm/chart_readme.py):
the committed file must be the generator's output, and the generator must refuse a value
nobody documented."""

from __future__ import annotations

import pytest

from helm import chart_readme

pytestmark = pytest.mark.unit

CHART_YAML = """\
name: demo
description: A demo chart.
version: 1.2.3
appVersion: "4.5"
kubeVersion: ">=1.30.0-0"
"""


def test_the_committed_chart_readme_is_the_generators_output():
    assert chart_readme.README.read_text() == chart_readme.current(), (
        "helm/retransmit-operator/README.md differs from values.yaml: run `python -m helm.chart_readme --write`")


def test_every_value_of_the_chart_has_a_row():
    text = chart_readme.current()
    for key in ("operator.image.repository", "agent.image.tag", "agent.securityMode", "maxRunningTraces", "monitoring.podMonitor.labels"):
        assert f"| `{key}` |" in text


def test_a_comment_becomes_the_description_and_the_value_the_default():
    values = """\
# Header comment, separated by a blank line: not a description.

# agent configures the agent.
agent:
  # agent.mode is how the agent runs:
  # `a` or `b`.
  mode: a
  # agent.resources for the agent container.
  resources:
    limits:
      cpu: "1"
  # agent.tolerations of the agent pods.
  tolerations:
    - operator: Exists
      effect: NoSchedule
# maxRunning traces at once.
maxRunning: 10
"""
    rows = {v.path: v for v in chart_readme.documented_values(values)}
    assert list(rows) == ["agent", "agent.mode", "agent.resources", "agent.tolerations", "maxRunning"]
    assert rows["agent"].section and rows["agent"].description == "agent configures the agent."
    assert rows["agent.mode"].description == "agent.mode is how the agent runs: `a` or `b`."
    assert rows["agent.resources"].default == {"limits": {"cpu": "1"}}
    assert rows["agent.tolerations"].default == [{"operator": "Exists", "effect": "NoSchedule"}]
    text = chart_readme.render(values, CHART_YAML)
    assert "| `agent.resources` | object | `{\"limits\": {\"cpu\": \"1\"}}` | agent.resources for the agent container. |" in text
    assert "| `maxRunning` | int | `10` | maxRunning traces at once. |" in text
    assert "| `agent` | object |  | agent configures the agent. |" in text
    assert "Header comment" not in text


def test_a_value_without_a_comment_is_refused_with_its_line():
    values = "# agent configures the agent.\nagent:\n  # agent.mode is a or b.\n  mode: a\n  level: 3\n"
    with pytest.raises(ValueError, match=r"line 5: agent.level has no comment"):
        chart_readme.documented_values(values)


def test_a_comment_that_does_not_start_with_its_key_is_refused():
    with pytest.raises(ValueError, match=r"line 2: the comment of replicas must start with 'replicas'"):
        chart_readme.documented_values("# how many operators run\nreplicas: 1\n")


def test_angle_brackets_and_pipes_survive_a_table_cell():
    text = chart_readme.render('# prefix replaces "<release>-<chart>" | or `a<b>`.\nprefix: ""\n', CHART_YAML)
    assert '"&lt;release&gt;-&lt;chart&gt;" \\| or `a<b>`.' in text
