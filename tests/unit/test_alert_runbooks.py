"""Every alert links to its runbook: annotations.runbook_url on each rule of the shipped rule
file, on the page the chart's runbookBaseURL names by default, at an anchor that is a section
of docs/monitoring.md with the four parts an on-call reader needs.

GitHub (and most Markdown renderers) make a heading's anchor by lower-casing it, dropping
punctuation and turning spaces into hyphens; `### RetransmitPodRetransmitting` is
`#retransmitpodretransmitting`.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "retransmit-operator"
RULES = yaml.safe_load((CHART / "rules" / "retransmit-rules.yaml").read_text())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
PAGE = ROOT / "docs" / "monitoring.md"
PARTS = ("Meaning", "Impact", "Diagnosis", "Fix")


def alerts() -> list[dict]:
    return [r for g in RULES["groups"] for r in g["rules"] if "alert" in r]


def heading_anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading's text."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def sections(markdown: str) -> dict[str, str]:
    """anchor -> the text up to the next heading of the same or a higher level, outside code."""
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)
    found: dict[str, str] = {}
    heads = list(re.finditer(r"^(#{1,6}) (.+)$", text, flags=re.M))
    for i, head in enumerate(heads):
        level = len(head.group(1))
        end = next((h.start() for h in heads[i + 1:] if len(h.group(1)) <= level), len(text))
        found[heading_anchor(head.group(2))] = text[head.end():end]
    return found


def test_heading_anchor_follows_githubs_rule():
    assert heading_anchor("RetransmitPodRetransmitting") == "retransmitpodretransmitting"
    assert heading_anchor("Metrics and their labels") == "metrics-and-their-labels"
    assert heading_anchor("The alerts (v2.0)") == "the-alerts-v20"


@pytest.mark.parametrize("rule", alerts(), ids=lambda r: r["alert"])
def test_every_alert_links_to_its_own_runbook_section_on_the_charts_default_page(rule):
    url = rule["annotations"]["runbook_url"]
    base, anchor = url.split("#", 1)
    assert base == VALUES["monitoring"]["prometheusRule"]["runbookBaseURL"]
    assert base.endswith("/docs/monitoring.md")
    assert anchor == heading_anchor(rule["alert"])
    runbook = sections(PAGE.read_text())
    assert anchor in runbook, f"docs/monitoring.md has no section #{anchor}"
    for part in PARTS:
        assert re.search(rf"\*\*{part}\.\*\*", runbook[anchor]), f"#{anchor} has no **{part}.**"


def test_the_runbook_has_a_section_for_each_alert_and_no_other():
    runbook = sections(PAGE.read_text())["runbook"]
    titles = re.findall(r"^### (\S+)$", re.sub(r"```.*?```", "", runbook, flags=re.S), flags=re.M)
    assert sorted(titles) == sorted(r["alert"] for r in alerts())


@pytest.mark.parametrize("rule", alerts(), ids=lambda r: r["alert"])
def test_rule_text_speaks_of_retransmitted_skbs_never_segments_per_second(rule):
    """The counters count tcp_retransmit_skb events: skbs, which TSO/GSO may fill with several
    segments."""
    text = " ".join(rule["annotations"].values())
    assert not re.search(r"segments?(/s| per second)", text), text
