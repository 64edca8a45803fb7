"""Every alert links to its runbook: annotations.runbook_url on each rule of the shipped rule
file, on the page the chart's runbookBaseURL names by default (docs/metrics.md), at the
anchor of the alert's own section of that page's Runbook, which has the four parts an
on-call reader needs. (test_doc_links.py checks the page's own links to those sections.)
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
PAGE = ROOT / "docs" / "metrics.md"
PARTS = ("Meaning", "Impact", "Diagnosis", "Fix")


def alerts() -> list[dict]:
    return [r for g in RULES["groups"] for r in g["rules"] if "alert" in r]


def runbook_sections() -> dict[str, str]:
    """Alert name -> its section: the `### Name` headings under `## Runbook`, code blocks out."""
    text = re.sub(r"^```.*?^```", "", PAGE.read_text(), flags=re.S | re.M)
    runbook = re.search(r"^## Runbook\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert runbook, "docs/metrics.md has no '## Runbook'"
    parts = re.split(r"^### (.+)\n", runbook.group(1), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


@pytest.mark.parametrize("rule", alerts(), ids=lambda r: r["alert"])
def test_every_alert_links_to_its_own_runbook_section_on_the_charts_default_page(rule):
    base, anchor = rule["annotations"]["runbook_url"].split("#", 1)
    assert base == VALUES["monitoring"]["prometheusRule"]["runbookBaseURL"]
    assert base.endswith("/blob/main/docs/metrics.md")
    # GitHub's anchor of a heading that is one CamelCase word: the word in lower case.
    assert anchor == rule["alert"].lower()
    section = runbook_sections().get(rule["alert"])
    assert section is not None, f"docs/metrics.md's Runbook has no '### {rule['alert']}'"
    for part in PARTS:
        assert f"**{part}.**" in section, f"{rule['alert']}'s runbook has no **{part}.**"


def test_the_runbook_has_a_section_for_each_alert_and_no_other():
    assert sorted(runbook_sections()) == sorted(r["alert"] for r in alerts())


@pytest.mark.parametrize("rule", alerts(), ids=lambda r: r["alert"])
def test_rule_text_speaks_of_retransmitted_skbs_never_segments_per_second(rule):
    """The counters count tcp_retransmit_skb events: skbs, which TSO/GSO may fill with several
    segments."""
    text = " ".join(rule["annotations"].values())
    assert not re.search(r"segments?(/s| per second)", text), text
