"""The program on older tracepoint layouts counts exactly what the reference counter sees.

Each case runs the agent's program in a private mount namespace whose tcp format files lack
fields (tests/harness/oldlayout.py): without `family` (5.0-5.11) and without `family` and
`state` (4.15-4.19), and the latter with bpf_jiffies64 and the ring buffer forced off (a 4.x
kernel has neither). The reference counter runs here, on the real layout. Loads: IPv4, IPv6
and dual-stack bulk transfers under loss, SYN and SYN-ACK retransmits (IPv4 and dual-stack).
"""

from __future__ import annotations

from collections import Counter

import pytest

from retransmit_agent.kernelinfo import OLD_KERNEL_MAX_INSNS
from retransmit_core.kernelvocab import UNKNOWN_STATE
from tests.harness import loads
from tests.harness.oldlayout import OldLayoutAgent
from tests.harness.refcount import per_flow, succeeded

pytestmark = pytest.mark.kernel

CASES = {
    "5.0-layout": dict(drop=("family",)),
    "4.15-layout": dict(drop=("family", "state")),
    "4.15-layout-no-jiffies-perfbuf": dict(drop=("family", "state"), ringbuf=False, jiffies64=False),
}


def make_every_kind_of_retransmit(ns) -> list[dict]:
    """Returns the dual-stack connections (their server side must come out as IPv4)."""
    loads.bulk(ns, loss=10, family="IPv4", port=5101, connections=2, nbytes=1 << 20)
    loads.bulk(ns, loss=10, family="IPv6", port=5102, connections=2, nbytes=1 << 20)
    dual = loads.bulk(ns, loss=10, family="IPv4", port=5103, connections=2, nbytes=1 << 20, dual_stack=True)
    loads.syn_drops(ns, port=5104, connections=3, seconds=1.5)
    loads.synack_drops(ns, port=5105, connections=3, seconds=1.5)
    dual += loads.synack_drops(ns, port=5106, connections=3, seconds=1.5, dual_stack=True)
    return dual


@pytest.mark.parametrize("case", sorted(CASES))
def test_older_layouts_count_exactly_like_the_reference(ns, reference, case):
    options = CASES[case]
    mine = loads.own_addresses(ns)
    with OldLayoutAgent(remote_cidrs=loads.own_cidrs(ns), **options) as agent:
        assert "error" not in agent.attached, agent.attached.get("error")
        assert len(agent.attached["masked"]) >= 2, "no format file was masked: the case proves nothing"
        features = agent.attached["features"]
        assert "family no" in features
        assert ("state no" in features) == ("state" in options["drop"])
        if options.get("ringbuf") is False:
            assert "perf buffer" in features and "clock per event" in features
        assert max(agent.attached["instructions"].values()) <= OLD_KERNEL_MAX_INSNS
        dual = make_every_kind_of_retransmit(ns)
        counts = reference.read()
        result = agent.finish()

    expected = per_flow(counts, lambda e: (e.local_ip in mine or e.remote_ip in mine) and succeeded(e))
    got = {(f[0], f[1], f[2], f[3], f[4]): (f[5], f[6]) for f in result["flows"]}
    assert {k[0] for k, (r, s) in expected.items() if r} == {"IPv4", "IPv6"}
    assert any(s for _r, s in expected.values()), "no SYN-ACK retransmits: the load proves nothing"
    assert got == expected
    assert result["retransmits"] == sum(r for r, _ in expected.values())
    assert result["synack_retransmits"] == sum(s for _, s in expected.values())

    # dual-stack servers' retransmits are IPv4 flows with plain addresses, never ::ffff:
    servers = {(c["server"][0], c["server"][1]) for c in dual}
    server_side = {k for k in got if (k[1], k[2]) in servers}
    assert server_side and {k[0] for k in server_side} == {"IPv4"}
    assert not any(k[1].startswith("::ffff:") or k[3].startswith("::ffff:") for k in got)

    states: Counter = Counter()
    for e, n in counts.items():
        if (e.local_ip in mine or e.remote_ip in mine) and succeeded(e):
            states["SYN_RECV" if e.synack else (e.state if "state" not in options["drop"] else UNKNOWN_STATE)] += n
    assert result["by_state"] == dict(states)


def test_a_states_filter_on_a_kernel_without_state_is_refused_with_the_reason(ns):
    with OldLayoutAgent(drop=("family", "state"), states=("ESTABLISHED",), remote_cidrs=loads.own_cidrs(ns)) as agent:
        error = agent.attached.get("error", "")
    assert "`state` field" in error and "remove the states filter" in error
