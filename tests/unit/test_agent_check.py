"""`retransmit-agent check` decides from probed facts: pure, one line per requirement."""

from __future__ import annotations

from dataclasses import replace

import pytest

from retransmit_agent.check import HostFacts, can_count, evaluate
from retransmit_agent.kernelinfo import TracepointLayout, misses_counted
from retransmit_agent.preflight import CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN, security_mode

pytestmark = pytest.mark.unit

BASE = {"sport", "dport", "saddr", "daddr", "saddr_v6", "daddr_v6", "skaddr"}
HEALTHY = HostFacts(
    release="6.1.0-57-amd64", tracefs="/sys/kernel/tracing", tracefs_how="tracefs at /sys/kernel/tracing",
    tracepoints={"tcp_retransmit_skb": True, "tcp_retransmit_synack": True},
    layout=TracepointLayout(skb=frozenset(BASE | {"state", "family"}), synack=frozenset(BASE | {"family"})),
    btf_problem="", ringbuf=True, jiffies64=True, capabilities=(1 << CAP_BPF) | (1 << CAP_PERFMON),
    headers="/usr/src/linux-headers-6.1.0-57-amd64 (matching)", bcc_version="0.26.0", misses_counted=False,
)


def by_name(facts: HostFacts) -> dict:
    return {line.name: line for line in evaluate(facts)}


def test_a_healthy_node_can_count_and_names_its_mode():
    lines = by_name(HEALTHY)
    assert can_count(list(lines.values()))
    assert lines["mode"].status == "ok" and "by TCP state" in lines["mode"].detail
    assert "no failed attempts" in lines["mode"].detail          # no err field on 6.1
    assert lines["missed events"].status == "degraded" and "unknown" in lines["missed events"].detail
    assert all(line.fix for line in lines.values() if line.status == "fail")


@pytest.mark.parametrize("change, failing, fix_words", [
    (dict(tracefs=None), "tracefs", "mount -t tracefs"),
    (dict(capabilities=0), "BPF permission", "privileged"),
    (dict(headers=None), "kernel headers", "linux-headers-6.1.0-57-amd64"),
    (dict(bcc_version=None), "bcc", "python3-bpfcc"),
    (dict(tracepoints={"tcp_retransmit_skb": True, "tcp_retransmit_synack": False}),
     "tracepoint tcp:tcp_retransmit_synack", "4.16"),
])
def test_each_missing_requirement_fails_with_its_fix(change, failing, fix_words):
    lines = by_name(replace(HEALTHY, **change))
    assert lines[failing].status == "fail" and fix_words in lines[failing].fix
    assert not can_count(list(lines.values()))
    assert lines["mode"].status == "fail"


def test_an_old_kernel_is_degraded_not_failed():
    old = replace(HEALTHY, release="4.18.0-553.el8", ringbuf=False, jiffies64=False,
                  btf_problem="/sys/kernel/btf/vmlinux: No such file or directory",
                  layout=TracepointLayout(skb=frozenset(BASE), synack=frozenset(BASE)))
    lines = by_name(old)
    assert can_count(list(lines.values()))
    assert {lines[n].status for n in ("TCP states", "ring buffer", "bpf_jiffies64", "retransmit causes")} == {"degraded"}
    assert "CONFIG_DEBUG_INFO_BTF" in lines["retransmit causes"].fix and "causes unknown" in lines["mode"].detail
    assert "state UNKNOWN" in lines["mode"].detail and "perf buffer" in lines["mode"].detail


def test_rendered_lines_carry_status_name_detail_and_fix():
    line = by_name(replace(HEALTHY, capabilities=0))["BPF permission"]
    text = line.render()
    assert text.startswith("FAIL") and "BPF permission:" in text and "-> run as root" in text


@pytest.mark.parametrize("release, counted", [("4.18.0-553.el8", False), ("6.6.30", False), ("6.7.0", True),
                                               ("6.18.44-fc", True), ("garbage", False)])
def test_missed_events_are_counted_for_tracepoints_from_6_7(release, counted):
    assert misses_counted(release) is counted


CAP_SYS_RESOURCE = 24
# CapEff of a privileged container on Linux 6.x (every capability up to CAP_CHECKPOINT_RESTORE).
PRIVILEGED_CAPS = (1 << 41) - 1


@pytest.mark.parametrize("caps, mode", [
    (PRIVILEGED_CAPS, "privileged"),
    (1 << CAP_SYS_ADMIN, "privileged"),            # SYS_ADMIN alone is enough (kernels before 5.8)
    ((1 << CAP_BPF) | (1 << CAP_PERFMON) | (1 << CAP_SYS_RESOURCE), "capabilities"),  # the chart's mode
    (1 << CAP_BPF, "unprivileged"),                # perf_event_open on a tracepoint needs PERFMON too
    (0, "unprivileged"),
])
def test_security_mode_names_what_the_capabilities_allow(caps, mode):
    """rtrace_agent_info{mode}: the operator's mode names, from the agent's effective capabilities."""
    assert security_mode(caps) == mode
    assert can_count(evaluate(replace(HEALTHY, capabilities=caps))) == (mode != "unprivileged")
