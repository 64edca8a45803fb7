"""Drops beside the retransmits: the kernel's reasons for dropping TCP packets of the traced flows.

On kernels whose skb:kfree_skb tracepoint has a `reason` field (Linux 5.17+) and whose BTF
gives struct sk_buff's offsets, the program also counts, in the kernel, every dropped TCP
packet of a traced flow per flow and reason (bpf/drops.bpf.c). This module decides whether
it can (`probe_drops`, from the format file and BTF, as kernelinfo does for the tcp
tracepoints), names the reasons from the kernel's own `enum skb_drop_reason` (never a copied
list: reasons are added in every release), and turns the maps into plain data.

    support = probe_drops(tracefs)                 # DropSupport: on, or why not
    support.defines                                # -D flags for the program
    snapshot = read_drops(bpf, support.reasons)    # DropSnapshot: by reason, per flow
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from retransmit_core.api import MAX_DROPPED_FLOWS, DroppedFlow, Endpoint, Flow, IPFamily, NodeStatus, add_counts, add_known
from retransmit_core.kernelvocab import DEFAULT_DROP_FLOW_CAPACITY

from .flows import AF_INET, FAMILY_NAMES, decode_address
from .kernelinfo import VMLINUX_BTF, parse_format_fields

KFREE_SKB = ("skb", "kfree_skb")
REASON_FIELD = "reason"
REASON_SINCE = "5.17"

# struct drop_key.direction
DROP_INBOUND = 0
DROP_OUTBOUND = 1
DIRECTIONS = {DROP_INBOUND: "inbound", DROP_OUTBOUND: "outbound"}

# The program's SKB_* constant -> struct sk_buff member, and its size in bytes as read.
SKB_FIELDS: dict[str, tuple[str, int]] = {
    "SKB_IIF": ("skb_iif", 4),                 # set by the receive path: the packet came in
    "SKB_NETWORK_HEADER": ("network_header", 2),
    "SKB_HEAD": ("head", 8),
}
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD

# enum skb_drop_reason's names carry one of these prefixes; the API uses the rest
# (NETFILTER_DROP), as the tracepoint prints them.
REASON_PREFIXES = ("SKB_DROP_REASON_", "SKB_")
# The name for slot 0 of drop_totals: reasons beyond the kernel's SKB_DROP_REASON_MAX
# (subsystem reasons, e.g. mac80211's, carry high bits). Slot 0 itself,
# SKB_NOT_DROPPED_YET, is never a drop.
OTHER_REASON = "SUBSYSTEM"
# Not counted: a kfree_skb() without a reason. On Linux 6.18 a TCP sender's incoming ACKs are
# freed so with no loss anywhere (measured: tests/kernel/test_drops.py), so it says nothing.
UNSPECIFIED_REASON = "NOT_SPECIFIED"


@dataclass(frozen=True)
class DropSupport:
    """Whether this kernel lets the program count drops, and what it needs to: the sk_buff
    offsets and the reason names. `problem` says why not (empty when it can)."""

    offsets: tuple[tuple[str, int], ...] = ()
    reasons: Mapping[int, str] = field(default_factory=dict)
    problem: str = ""

    @property
    def available(self) -> bool:
        return not self.problem

    def value_of(self, name: str) -> int:
        """A reason's number in this kernel; 0 (SKB_NOT_DROPPED_YET, never a drop) when it has none."""
        return next((value for value, n in self.reasons.items() if n == name), 0)

    @property
    def reason_slots(self) -> int:
        """drop_totals' size: a power of two above every reason the kernel names."""
        largest = max(self.reasons, default=1)
        return 1 << max(largest, 1).bit_length()


def reason_names(enum_values: Mapping[int, str]) -> dict[int, str]:
    """{value: name} of enum skb_drop_reason without its prefixes, leaving out the markers
    that are no reason of a drop (NOT_DROPPED_YET, CONSUMED, MAX, SUBSYS_MASK...)."""
    names = {}
    for value, raw in enum_values.items():
        name = next((raw[len(p):] for p in REASON_PREFIXES if raw.startswith(p)), raw)
        if name in ("NOT_DROPPED_YET", "CONSUMED", "MAX") or name.startswith("SUBSYS"):
            continue
        names[value] = name
    return names


def has_reason_field(tracefs: Path) -> Optional[bool]:
    """Whether skb:kfree_skb's format file declares `reason`; None when it has no format file."""
    path = tracefs.joinpath("events", *KFREE_SKB, "format")
    try:
        return REASON_FIELD in parse_format_fields(path.read_text())
    except OSError:
        return None


def probe_drops(tracefs: Path, btf_path: Optional[str] = VMLINUX_BTF) -> DropSupport:
    """What this kernel offers for counting drops: the format file first (no `reason`: the
    kernel predates 5.17, nothing else matters), then the node's BTF."""
    from .btf import Btf, BtfError

    field_present = has_reason_field(tracefs)
    if field_present is None:
        return DropSupport(problem="no skb:kfree_skb tracepoint under " + str(tracefs / "events"))
    if not field_present:
        return DropSupport(problem=f"skb:kfree_skb has no `reason` field (added in Linux {REASON_SINCE})")
    if not btf_path:
        return DropSupport(problem="BTF disabled: the packet's addresses need struct sk_buff's offsets")
    try:
        btf = Btf.load(btf_path)
        offsets = []
        for name, (member, size) in SKB_FIELDS.items():
            m = btf.member("sk_buff", member)
            if m.bit_offset % 8 or m.bit_size != size * 8:
                return DropSupport(problem=f"sk_buff.{member} is {m.bit_size} bits at bit {m.bit_offset} "
                                           f"in this kernel's BTF, not {size * 8} aligned")
            offsets.append((name, m.byte_offset))
        reasons = reason_names(btf.enum("skb_drop_reason"))
    except BtfError as e:
        return DropSupport(problem=f"{e}: the packet's addresses need struct sk_buff's offsets from BTF")
    return DropSupport(offsets=tuple(offsets), reasons=reasons)


def drop_defines(support: DropSupport, capacity: int = DEFAULT_DROP_FLOW_CAPACITY) -> dict[str, int]:
    """The program's -D constants for bpf/drops.h (with HAVE_DROP_REASONS)."""
    return {"HAVE_DROP_REASONS": 1, "DROP_FLOW_CAPACITY": capacity,
            "DROP_REASON_SLOTS": support.reason_slots,
            "DROP_REASON_NOT_SPECIFIED": support.value_of(UNSPECIFIED_REASON), "DROP_INBOUND": DROP_INBOUND,
            "DROP_OUTBOUND": DROP_OUTBOUND, "ETH_P_IP_": ETH_P_IP, "ETH_P_IPV6_": ETH_P_IPV6,
            **dict(support.offsets)}


def describe(support: Optional[DropSupport], wanted: bool = True) -> str:
    """One phrase for logs and `check`: drops on, or why off."""
    if not wanted:
        return "drops off (the trace turned them off)"
    if support is None:
        return "drops not probed"
    return "drops by reason" if support.available else f"drops off ({support.problem})"


# ---- reading ------------------------------------------------------------------------------

FlowTuple = tuple[str, str, int, str, int]   # (family, local ip, local port, remote ip, remote port)


@dataclass(frozen=True)
class DroppedFlowCounters:
    """One flow's drops on this node as the kernel kept them (local: the traced end)."""

    family: str
    local_ip: str
    local_port: int
    remote_ip: str
    remote_port: int
    inbound: int = 0
    outbound: int = 0
    by_reason: Mapping[str, int] = field(default_factory=dict)

    @property
    def key(self) -> FlowTuple:
        return (self.family, self.local_ip, self.local_port, self.remote_ip, self.remote_port)

    @property
    def drops(self) -> int:
        return self.inbound + self.outbound

    def to_api(self) -> DroppedFlow:
        return DroppedFlow(local=Endpoint(ip=self.local_ip, port=self.local_port),
                           remote=Endpoint(ip=self.remote_ip, port=self.remote_port),
                           family=IPFamily(self.family), drops=self.drops, inbound=self.inbound,
                           outbound=self.outbound, by_reason=dict(sorted(self.by_reason.items())))


@dataclass(frozen=True)
class DropSnapshot:
    """The drop counters at one moment, cumulative since the program was opened. by_reason is
    exact (per-CPU totals); flows are those still in the LRU map."""

    by_reason: dict[str, int]
    flows: list[DroppedFlowCounters]
    # kfree_skb hits the kernel did not run the program for (another BPF program was running
    # on that CPU; Linux 6.7+ counts them): drops may be higher by up to this many
    missed: int = 0

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())


def reason_name(reasons: Mapping[int, str], value: int) -> str:
    """The kernel's name of a reason number; numbers it does not name keep their number."""
    return reasons.get(value, OTHER_REASON if value == 0 else str(value))


def totals_by_reason(per_slot: Iterable[int], reasons: Mapping[int, str]) -> dict[str, int]:
    """{reason: drops} from drop_totals' slots summed over CPUs, zeros left out."""
    return {reason_name(reasons, slot): int(n) for slot, n in enumerate(per_slot) if n}


def aggregate_flows(entries: Iterable[tuple[tuple, int]], reasons: Mapping[int, str]) -> list[DroppedFlowCounters]:
    """Per flow, from the map's (key, count) entries: key = (family, saddr bytes, daddr bytes,
    sport, dport, direction, reason), one entry per flow, direction and reason."""
    acc: dict[FlowTuple, list] = {}
    for (family, saddr, daddr, sport, dport, direction, reason), count in entries:
        key = (FAMILY_NAMES[family], decode_address(family, saddr), sport, decode_address(family, daddr), dport)
        inbound, outbound, by_reason = acc.setdefault(key, [0, 0, {}])
        if direction == DROP_INBOUND:
            acc[key][0] = inbound + count
        else:
            acc[key][1] = outbound + count
        name = reason_name(reasons, reason)
        by_reason[name] = by_reason.get(name, 0) + count
    return [DroppedFlowCounters(*key, inbound=i, outbound=o, by_reason=r) for key, (i, o, r) in acc.items()]


def read_drops(bpf: Any, reasons: Mapping[int, str], missed: int = 0) -> DropSnapshot:
    """The drop maps of a program compiled with HAVE_DROP_REASONS."""
    totals = bpf[b"drop_totals"]
    per_slot = [sum(totals[totals.Key(slot)]) for slot in range(len(totals))] if len(totals) else []
    entries = []
    for key, count in bpf[b"drops"].items():
        size = 4 if key.family == AF_INET else 16   # IPv4 in the first 4 bytes
        entries.append(((key.family, bytes(key.saddr)[:size], bytes(key.daddr)[:size], key.sport, key.dport,
                         key.direction, key.reason), count.value))
    return DropSnapshot(by_reason=totals_by_reason(per_slot, reasons), flows=aggregate_flows(entries, reasons),
                        missed=missed)


# ---- the node's report --------------------------------------------------------------------

@dataclass(frozen=True)
class DropBaseline:
    """Drops an earlier agent on this node already reported (its report's drop fields); a
    restarted agent adds its kernel's fresh counts to them, as resume.Baseline does."""

    drops: Optional[int] = None
    by_reason: Mapping[str, int] = field(default_factory=dict)
    flows: Mapping[FlowTuple, DroppedFlow] = field(default_factory=dict)

    @classmethod
    def from_entry(cls, entry: Optional[NodeStatus]) -> "DropBaseline":
        if entry is None:
            return cls()
        return cls(drops=entry.drops, by_reason=dict(entry.drops_by_reason or {}),
                   flows={dropped_key(f): f for f in entry.dropped_flows or ()})

    @property
    def empty(self) -> bool:
        return not self.drops and not self.flows


def dropped_key(flow: DroppedFlow | Flow) -> FlowTuple:
    """The flow tuple of an API flow, from its local end: a Flow's local end retransmitted,
    so a flow of this node matches its own drops by the same tuple."""
    return (str(flow.family), flow.local.ip, flow.local.port, flow.remote.ip, flow.remote.port)


def _add_flow(old: Optional[DroppedFlow], fresh: Optional[DroppedFlowCounters]) -> DroppedFlow:
    if fresh is None:
        return old
    new = fresh.to_api()
    if old is None:
        return new
    return new.model_copy(update={"drops": old.drops + new.drops, "inbound": old.inbound + new.inbound,
                                  "outbound": old.outbound + new.outbound,
                                  "by_reason": add_counts(old.by_reason, new.by_reason)})


def ranked_dropped(flows: Iterable[DroppedFlow], limit: int = MAX_DROPPED_FLOWS) -> list[DroppedFlow]:
    """The flows with the most drops (ties by their tuple), at most `limit`."""
    return sorted(flows, key=lambda f: (-f.drops, dropped_key(f)))[:limit]


def drop_fields(baseline: DropBaseline, snapshot: Optional[DropSnapshot], top_flows: list[Flow]) -> dict[str, Any]:
    """The NodeStatus fields on drops (an update for model_copy): totals and byReason resumed
    from `baseline`, the busiest dropped flows, and each of `top_flows` with its own drops.
    Nothing when neither this agent nor an earlier one counted drops (drops stays absent)."""
    if snapshot is None and baseline.drops is None:
        return {}
    merged = dict(baseline.flows)
    for counters in (snapshot.flows if snapshot else ()):
        merged[counters.key] = _add_flow(merged.get(counters.key), counters)
    flows = [f.model_copy(update={"drops": merged[dropped_key(f)].by_reason}) if dropped_key(f) in merged else f
             for f in top_flows]
    return {
        "drops": add_known(baseline.drops, snapshot.total if snapshot else None),
        "drops_by_reason": add_counts(baseline.by_reason, snapshot.by_reason if snapshot else {}),
        "dropped_flows": ranked_dropped(merged.values()),
        "top_flows": flows,
    }
