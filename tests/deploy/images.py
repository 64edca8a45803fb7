"""The project's two images as the deploy tests use them: their names (the Makefile's
OPERATOR_IMAGE and AGENT_IMAGE, passed as RTRACE_TEST_*), building them as the tree is now,
and the chart values that run them on a node without a registry."""

from __future__ import annotations

import os
import subprocess

from helm.render_manifests import ROOT

OPERATOR_IMAGE = os.environ.get("RTRACE_TEST_OPERATOR_IMAGE", "localhost/retransmit-operator:dev")
AGENT_IMAGE = os.environ.get("RTRACE_TEST_AGENT_IMAGE", "localhost/retransmit-agent:dev")


def build(*make_targets: str) -> None:
    """`make image-build` (and `make_targets` first): layers are cached, so seconds when
    nothing changed."""
    subprocess.run(["make", "-s", "-C", str(ROOT), *make_targets, "image-build",
                    f"OPERATOR_IMAGE={OPERATOR_IMAGE}", f"AGENT_IMAGE={AGENT_IMAGE}"],
                   check=True, stdout=subprocess.DEVNULL)


def chart_values(pull_policy: str = "Never") -> list[str]:
    """helm --set flags for both images, as built here."""
    flags: list[str] = []
    for key, image in (("operator", OPERATOR_IMAGE), ("agent", AGENT_IMAGE)):
        repository, tag = image.rsplit(":", 1)
        flags += ["--set", f"{key}.image.repository={repository}", "--set", f"{key}.image.tag={tag}",
                  "--set", f"{key}.image.pullPolicy={pull_policy}"]
    return flags
