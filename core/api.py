"""The RetransmitTrace API (retransmit.dev/v1alpha1): the single source of truth.

The CRD's openAPIV3Schema is generated from these models (retransmit_operator.crd), the
agent builds its node report with them, and the operator validates specs with them. This
module imports nothing from kopf or kubernetes so the agent can use it.

Kubernetes names (camelCase) are the aliases; Python code uses snake_case attributes.
Model instances are dumped for the API with `to_api(model)`.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import datetime
from enum import Enum
from typing import Annotated, Any, ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pydantic.alias_generators import to_camel

from .kernelvocab import DEFAULT_OWNER_CAPACITY, DEFAULT_SAMPLES_PER_SECOND, RETRANSMIT_CAUSES, SOCKET_READ_INTERVAL_MS, TCP_STATES
from .ratio import retransmit_ratio

GROUP = "retransmit.dev"
VERSION = "v1alpha1"
KIND = "RetransmitTrace"
PLURAL = "retransmittraces"
SINGULAR = "retransmittrace"
SHORT_NAME = "rtrace"
API_VERSION = f"{GROUP}/{VERSION}"
# One node's results in one trace: namespaced (the operator's namespace), owned by the trace.
REPORT_KIND = "RetransmitNodeReport"
REPORT_PLURAL = "retransmitnodereports"
REPORT_SINGULAR = "retransmitnodereport"
REPORT_SHORT_NAME = "rtreport"

# Go's time.ParseDuration syntax, restricted to units that make sense for a trace.
GO_DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"

# CIDR shape for the CRD schema (RE2 and Python alike). IPv4 is checked exactly; IPv6 only
# for its shape: the full syntax ("1:::2/64" has the shape but is not an address) is left to
# pydantic in the operator. CEL's isCIDR() would check it all, but only API servers >= 1.32
# accept it in a CRD, and OpenShift 4.14-4.18 run 1.27-1.31.
_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
CIDR_PATTERN = (
    rf"^(({_OCTET}\.){{3}}{_OCTET}/(3[0-2]|[12]?[0-9])"
    r"|[0-9A-Fa-f]{0,4}(:[0-9A-Fa-f]{0,4}){1,7}(:[0-9.]{7,15})?/(12[0-8]|1[01][0-9]|[1-9]?[0-9]))$"
)
# Kubernetes object and label syntax (apimachinery's validation), for fields the agent matches.
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
LABEL_KEY_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
# The DaemonSet is named rtrace-<trace>: 7 + 56 = 63 keeps it a valid label value too.
MAX_TRACE_NAME_LENGTH = 56


def _cel(rule: str, message: str) -> dict[str, str]:
    """One x-kubernetes-validations entry (CEL), evaluated by the API server at apply time."""
    return {"rule": rule, "message": message}


def k8s_extra(**extensions: Any) -> dict[str, Any]:
    """json_schema_extra for Kubernetes schema extensions: x_kubernetes_list_type -> x-kubernetes-list-type."""
    return {key.replace("_", "-"): value for key, value in extensions.items()}


def check_label_key(key: str) -> Optional[str]:
    """Why `key` is not a Kubernetes label key, or None when it is one."""
    prefix, _, name = key.rpartition("/")
    if not re.fullmatch(LABEL_KEY_PATTERN, key) or len(name) > 63 or len(prefix) > 253:
        return f"{key!r} is not a label key: use NAME or PREFIX/NAME (NAME at most 63 of [A-Za-z0-9-_.], PREFIX a DNS subdomain)"
    return None


def check_label_value(value: str) -> Optional[str]:
    """Why `value` is not a Kubernetes label value, or None when it is one."""
    if len(value) > 63 or not re.fullmatch(LABEL_VALUE_PATTERN, value):
        return f"{value!r} is not a label value: use at most 63 of [A-Za-z0-9-_.], starting and ending alphanumeric"
    return None


def _check_labels(labels: dict[str, str]) -> dict[str, str]:
    for key, value in labels.items():
        problem = check_label_key(key) or check_label_value(value)
        if problem:
            raise ValueError(f"[{key}]: {problem}")  # spec.nodeSelector[KEY], as Kubernetes names map entries
    return labels
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

# Defaults of the spec that other parts (the agent's local mode, the bench) start from too.
DEFAULT_TOP_FLOWS = 10
DEFAULT_EVENTS_KEPT = 20


def parse_duration(text: str) -> float:
    """Seconds in a Go-style duration ("90s", "1m30s", "2h"); ValueError names the fix."""
    if not re.fullmatch(GO_DURATION_PATTERN, text or ""):
        raise ValueError(
            f"{text!r} is not a duration: use a number and a unit (ms, s, m, h), e.g. '90s' or '1m30s'"
        )
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))


class IPFamily(str, Enum):
    IPV4 = "IPv4"
    IPV6 = "IPv6"


TCPState = Enum("TCPState", {name: name for name in TCP_STATES}, type=str)  # type: ignore[misc]


class ApiModel(BaseModel):
    """camelCase on the wire, snake_case in Python, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", use_enum_values=True
    )


class RatioModel(ApiModel):
    """A model whose retrans_ratio follows two of its counters, named by RATIO_OF
    (retransmitted, sent): one definition (retransmit_core.ratio), set from the counters
    whatever a reader sends, never on its own."""

    RATIO_OF: ClassVar[tuple[str, str]]

    @model_validator(mode="after")
    def _ratio_from_counters(self) -> "RatioModel":
        retransmitted, sent = self.RATIO_OF
        self.__dict__["retrans_ratio"] = retransmit_ratio(getattr(self, retransmitted), getattr(self, sent))
        return self


def to_api(model: BaseModel) -> dict[str, Any]:
    """The JSON-ready dict the Kubernetes API expects (aliases, no unset optionals)."""
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


# ---------------------------------------------------------------- spec

Port = Annotated[int, Field(ge=1, le=65535)]


class Toleration(ApiModel):
    """A core/v1 Toleration, so agents can run on tainted nodes."""

    model_config = ConfigDict(json_schema_extra=k8s_extra(x_kubernetes_validations=[
        _cel("self.operator == 'Exists' || (has(self.key) && self.key != '')",
             "tolerations[]: an empty key needs operator Exists (it matches every taint); give a key or set operator: Exists"),
        _cel("self.operator != 'Exists' || !has(self.value) || self.value == ''",
             "tolerations[].value must be empty when operator is Exists: remove value or use operator: Equal"),
        _cel("!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
             "tolerations[].tolerationSeconds applies only to effect NoExecute: remove it or set effect: NoExecute"),
    ]))

    key: Optional[str] = Field(None, max_length=317, description="Taint key the toleration applies to; empty with operator Exists matches all taints.")
    operator: Literal["Exists", "Equal"] = Field("Equal", description="Exists or Equal.")
    value: Optional[str] = Field(None, max_length=63, description="Taint value to match when operator is Equal.")
    effect: Optional[Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]] = Field(
        None, description="Taint effect to match; empty matches all effects."
    )
    toleration_seconds: Optional[int] = Field(None, description="For NoExecute: how long the agent stays after the taint appears.")


class LabelSelectorRequirement(ApiModel):
    """One set-based requirement of a label selector."""

    model_config = ConfigDict(json_schema_extra=k8s_extra(x_kubernetes_validations=[
        _cel("self.operator in ['In', 'NotIn'] ? (has(self.values) && size(self.values) > 0) : (!has(self.values) || size(self.values) == 0)",
             "matchExpressions[]: operators In and NotIn need values, Exists and DoesNotExist take none"),
    ]))

    key: str = Field(max_length=317, description="Label key.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(description="In, NotIn, Exists or DoesNotExist.")
    values: list[Annotated[str, Field(max_length=63)]] = Field(default_factory=list, max_length=16, description="Values for In and NotIn (at most 16); empty for Exists and DoesNotExist.")

    @field_validator("key")
    @classmethod
    def _key_is_label_key(cls, key: str) -> str:
        problem = check_label_key(key)
        if problem:
            raise ValueError(problem)
        return key


class LabelSelector(ApiModel):
    """A metav1.LabelSelector: matchLabels AND matchExpressions."""

    match_labels: dict[str, Annotated[str, Field(json_schema_extra={"maxLength": 63, "pattern": LABEL_VALUE_PATTERN})]] = Field(
        default_factory=dict, max_length=32, description="Labels a pod must carry, all of them (at most 32).")
    match_expressions: list[LabelSelectorRequirement] = Field(default_factory=list, max_length=16, description="Set-based requirements, all of them (at most 16).")

    @field_validator("match_labels")
    @classmethod
    def _labels_valid(cls, labels: dict[str, str]) -> dict[str, str]:
        return _check_labels(labels)


class Filter(ApiModel):
    """Which retransmits count. Applied in the kernel; an empty list means no restriction."""

    ip_families: list[IPFamily] = Field(
        default_factory=lambda: [IPFamily.IPV4, IPFamily.IPV6], max_length=2,
        description="IP families to trace: IPv4, IPv6 or both (default both).",
        json_schema_extra=k8s_extra(x_kubernetes_list_type="set", default=["IPv4", "IPv6"]),
    )
    ports: list[Port] = Field(default_factory=list, max_length=64, description="Keep flows whose local or remote port is one of these (1-65535).",
                              json_schema_extra=k8s_extra(x_kubernetes_list_type="set"))
    # The pattern goes into the CRD only: pydantic's own check below gives the better message.
    remote_cidrs: list[Annotated[str, Field(json_schema_extra={"pattern": CIDR_PATTERN, "maxLength": 64})]] = Field(
        default_factory=list, max_length=64, alias="remoteCIDRs",
        description="Keep flows whose remote address is inside one of these CIDRs, e.g. 10.0.0.0/8 or fd00::/8.",
        json_schema_extra=k8s_extra(x_kubernetes_list_type="set"))
    states: list[TCPState] = Field(default_factory=list, max_length=len(TCP_STATES), description="Keep retransmits that happened in these TCP states (kernel names without TCP_, e.g. ESTABLISHED, SYN_SENT).",
                                   json_schema_extra=k8s_extra(x_kubernetes_list_type="set"))

    @field_validator("remote_cidrs")
    @classmethod
    def _cidrs_parse(cls, cidrs: list[str]) -> list[str]:
        for i, cidr in enumerate(cidrs):
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"remoteCIDRs[{i}]: {cidr!r} is not a CIDR: use ADDRESS/PREFIX such as 10.0.0.0/8 or fd00::/8") from None
        return cidrs


class Events(ApiModel):
    """Per-event samples: rate-limited in the kernel, the most recent kept in status."""

    max_per_second: int = Field(DEFAULT_SAMPLES_PER_SECOND, ge=0, le=10000, description="Samples per second per node sent to user space (0 disables samples); drops are counted in lostEvents.")
    keep: int = Field(DEFAULT_EVENTS_KEPT, ge=0, le=100, description="How many recent samples each node keeps in its report (RetransmitNodeReport spec.recentEvents).")


class RetransmitTraceSpec(ApiModel):
    """What to trace, where, and for how long. Every field is optional."""

    duration: Optional[str] = Field(None, pattern=GO_DURATION_PATTERN, max_length=64, description="How long the trace runs, Go-style ('90s', '10m', '2h'); unset runs until the trace is deleted.",
                                    json_schema_extra=k8s_extra(x_kubernetes_validations=[
                                        _cel(f"!self.matches(r'{GO_DURATION_PATTERN}') || duration(self) > duration('0s')",
                                             "spec.duration must be longer than 0s: omit it to trace until deleted, or give e.g. '5m'"),
                                    ]))
    node_selector: dict[str, Annotated[str, Field(json_schema_extra={"maxLength": 63, "pattern": LABEL_VALUE_PATTERN})]] = Field(
        default_factory=dict, max_length=32, description="Run agents only on nodes with these labels (at most 32; default: all Linux nodes).")
    tolerations: list[Toleration] = Field(default_factory=list, max_length=16, description="Tolerations for the agent pods (at most 16), replacing the chart's agent.tolerations (which tolerate every taint by default).")
    namespaces: list[Annotated[str, Field(max_length=63, pattern=DNS_LABEL_PATTERN)]] = Field(
        default_factory=list, max_length=256, description="Keep only flows whose local side is a pod in one of these namespaces (default: all).",
        json_schema_extra=k8s_extra(x_kubernetes_list_type="set"))
    pod_selector: Optional[LabelSelector] = Field(None, description="Keep only flows whose local side is a pod matching this selector (default: all).")
    filter: Filter = Field(default_factory=Filter, description="Kernel-side filters: families, ports, remote CIDRs, TCP states.",
                           json_schema_extra={"default": {}})
    report_interval: str = Field("10s", pattern=GO_DURATION_PATTERN, max_length=64, description="How often each agent writes its node entry (Go-style duration, at least 1s).",
                                 json_schema_extra=k8s_extra(x_kubernetes_validations=[
                                     _cel(f"!self.matches(r'{GO_DURATION_PATTERN}') || duration(self) >= duration('1s')",
                                          "spec.reportInterval must be at least 1s, or agents would flood the API server: use e.g. '10s'"),
                                 ]))
    top_flows: int = Field(DEFAULT_TOP_FLOWS, ge=1, le=100, description="How many flows each node and the summary keep, busiest first.")
    events: Events = Field(default_factory=Events, description="Per-event samples.", json_schema_extra={"default": {}})
    drops: bool = Field(True, description="Also count the kernel's drops of the traced flows' TCP packets by reason (skb:kfree_skb; nodes with Linux 5.17+ and BTF). false saves the cost on nodes that drop or free many packets.")

    @field_validator("node_selector")
    @classmethod
    def _node_labels_valid(cls, labels: dict[str, str]) -> dict[str, str]:
        return _check_labels(labels)

    @field_validator("report_interval")
    @classmethod
    def _interval_at_least_1s(cls, value: str) -> str:
        if parse_duration(value) < 1:
            raise ValueError(f"{value!r} is shorter than 1s: agents would flood the API server; use '1s' or more")
        return value

    @field_validator("duration")
    @classmethod
    def _duration_positive(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and parse_duration(value) <= 0:
            raise ValueError(f"{value!r} is zero: omit duration to trace until deleted, or give e.g. '5m'")
        return value

    @property
    def duration_seconds(self) -> Optional[float]:
        return parse_duration(self.duration) if self.duration else None

    @property
    def report_interval_seconds(self) -> float:
        return parse_duration(self.report_interval)


# ---------------------------------------------------------------- status

class Phase(str, Enum):
    PENDING = "Pending"
    RUNNING = "Running"
    COMPLETED = "Completed"
    FAILED = "Failed"


def format_endpoint(ip: str, port: int) -> str:
    """'10.0.0.1:80' or '[fd00::1]:80': an address and port as people and URLs write them."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class Backend(ApiModel):
    """Where a connection to a Service address was translated to (its DNAT, as the node's
    conntrack table holds it while the connection lives): the backend's address and port,
    named like any remote end."""

    ip: str = Field(description="IPv4 or IPv6 address the Service address was translated to.")
    port: int = Field(ge=0, le=65535, description="TCP port it was translated to.")
    pod: Optional[str] = Field(None, description="Pod owning that address, when known.")
    namespace: Optional[str] = Field(None, description="Namespace of that pod.")
    node: Optional[str] = Field(None, description="Set when the address is a node's own.")


class Endpoint(ApiModel):
    """One side of a connection; pod/namespace filled when the IP belongs to a known pod."""

    ip: str = Field(description="IPv4 or IPv6 address.")
    port: int = Field(ge=0, le=65535, description="TCP port.")
    pod: Optional[str] = Field(None, description="Pod owning this address, when known.")
    namespace: Optional[str] = Field(None, description="Namespace of that pod.")
    node: Optional[str] = Field(None, description="Set when the address is a node's own (hostNetwork pods, node IPs).")
    service: Optional[str] = Field(None, description="Service whose address (cluster, external or load-balancer IP) or NodePort this is; namespace holds the Service's namespace.")
    service_port: Optional[str] = Field(None, description="The Service port's name (its number when unnamed) that the flow's port is.")
    outside: Optional[bool] = Field(None, description="True when no pod, Service or node of the cluster has this address.")
    backend: Optional[Backend] = Field(None, description="Remote end only: the backend a Service address was translated to, read from the node's conntrack while it held the connection.")
    unit: Optional[str] = Field(None, description="Local end only: the node's systemd unit (e.g. kubelet.service) whose socket this is, when the socket's cgroup names a node process rather than a pod.")


class ServiceCount(ApiModel):
    """Retransmits towards one Service, over the flows whose remote end is its address or NodePort."""

    namespace: str = Field(description="Service namespace.")
    service: str = Field(description="Service name.")
    retransmits: int = Field(0, ge=0, description="Retransmits (skb and SYN-ACK) of the nodes' top flows towards it.")


class SocketSnapshot(ApiModel):
    """The retransmitting socket, read through the node's BTF (absent without BTF)."""

    srtt_microseconds: int = Field(ge=0, description=f"Smoothed round-trip time, read at the first retransmit of the flow's latest burst and again at a retransmit {SOCKET_READ_INTERVAL_MS} ms or more after the last read: at most that long before the flow's latest retransmit.")
    congestion_window: int = Field(ge=0, description="Congestion window in segments, same moment.")
    segments_in_flight: int = Field(ge=0, description="Segments sent and not yet acknowledged, same moment.")
    retransmitted_in_flight: int = Field(ge=0, description="Retransmitted segments not yet acknowledged, same moment.")
    consecutive_timeouts: int = Field(ge=0, description="Retransmission timeouts in a row without progress, at the latest retransmit: a growing number means a black hole.")


ByCause = Annotated[dict[Literal[RETRANSMIT_CAUSES], int], Field(
    default_factory=dict,
    description="Retransmits by cause: timeout (the retransmission timer fired: a stall of 200 ms or more), "
                "fast (fast retransmit in recovery: one round trip), probe (tail loss probe or early retransmit), "
                "unknown (no BTF on the node, or a SYN-ACK).",
    # Atomic: its one writer replaces it whole. As a granular map, applying an empty one after
    # a non-empty one made server-side apply store null, which the schema refuses (HTTP 422,
    # and no status write for the trace until its reports came back).
    json_schema_extra=k8s_extra(x_kubernetes_map_type="atomic"))]


# ---------------------------------------------------------------- drops (skb:kfree_skb reasons)

MAX_DROPPED_FLOWS = 20   # flows in a report's droppedFlows: the busiest

ByReason = Annotated[dict[str, int], Field(
    default_factory=dict,
    description="TCP packets the kernel dropped, by its drop reason (enum skb_drop_reason without "
                "SKB_DROP_REASON_, e.g. NETFILTER_DROP, TCP_OFO_DROP, SOCKET_RCVBUFF, NOT_SPECIFIED).",
    json_schema_extra=k8s_extra(x_kubernetes_map_type="atomic"))]   # atomic: see ByCause


class DroppedFlow(ApiModel):
    """A flow whose TCP packets a traced node dropped, seen from that node's traced end: `local`
    is the end on this node (the receiver of an inbound drop, the sender of an outbound one)."""

    local: Endpoint = Field(description="The flow's end on this node.")
    remote: Endpoint = Field(description="The peer.")
    family: IPFamily = Field(description="IPv4 or IPv6.")
    drops: int = Field(0, ge=0, description="Packets of the flow this node dropped (inbound + outbound).")
    inbound: int = Field(0, ge=0, description="Dropped on their way in to the local end (sent by the remote end).")
    outbound: int = Field(0, ge=0, description="Dropped on their way out from the local end.")
    by_reason: ByReason


class Flow(RatioModel):
    """Retransmits of one connection. `local` is the side that retransmitted."""

    RATIO_OF = ("total_retrans", "data_segs_out")

    local: Endpoint = Field(description="The side that retransmitted (the tracepoint's source address).")
    remote: Endpoint = Field(description="The peer.")
    family: IPFamily = Field(description="IPv4 or IPv6.")
    retransmits: int = Field(0, ge=0, description="tcp_retransmit_skb events (one per retransmitted skb).")
    synack_retransmits: int = Field(0, ge=0, description="tcp_retransmit_synack events.")
    last_state: Optional[TCPState] = Field(None, description="TCP state at the latest retransmit.")
    first_seen: Optional[datetime] = Field(None, description="First retransmit of this flow during the trace.")
    last_seen: Optional[datetime] = Field(None, description="Latest retransmit of this flow.")
    node: Optional[str] = Field(None, description="Node that saw the flow (set in status.summary.topFlows).")
    by_cause: ByCause
    socket: Optional[SocketSnapshot] = Field(None, description="The retransmitting socket (needs BTF on the node; absent for SYN-ACK-only flows).")
    drops: Optional[dict[str, int]] = Field(None, description="This flow's TCP packets its node dropped, by reason (skb:kfree_skb, Linux 5.17+); absent when that node dropped none or does not count drops.",
                                            json_schema_extra=k8s_extra(x_kubernetes_map_type="atomic"))
    data_segs_out: Optional[int] = Field(None, ge=0, description="Data segments the connection sent over its life, retransmissions included (tcp_sock data_segs_out, as ss -ti and TCP_INFO show it), read with socket. Absent where the node's BTF lacks it.")
    total_retrans: Optional[int] = Field(None, ge=0, description="Segments the connection retransmitted over its life (tcp_sock total_retrans), same read. It counts segments where retransmits counts events, and from the connection's start, not the trace's.")
    retrans_ratio: Optional[float] = Field(None, ge=0, description="totalRetrans / dataSegsOut: the share of the connection's segments that were retransmissions, about its loss rate. Set from the two counters, never on its own.")
    peer_drops: Optional[dict[str, int]] = Field(None, description="In status.summary.topFlows: this flow's packets the node at the remote end dropped on their way in, by reason (that node's report lists the flow reversed); absent when that end dropped none or is no traced node counting drops.",
                                                 json_schema_extra=k8s_extra(x_kubernetes_map_type="atomic"))
    loss_at: Optional[str] = Field(None, description="In status.summary.topFlows: where this flow's packets were lost, as far as the traced nodes tell: the nodes that dropped them and why, or 'not dropped on a traced node' (the loss is on the wire or on an untraced box) when both ends' nodes count drops and neither dropped any; absent when a node that would know does not count drops.")



FlowTuple = tuple[str, str, int, str, int]   # (family, local ip, local port, remote ip, remote port)


def flow_tuple(flow: Flow) -> FlowTuple:
    """A flow's identity within one node's report, as a hashable tuple (the models keep
    `family` a plain string: use_enum_values)."""
    return (str(flow.family), flow.local.ip, flow.local.port, flow.remote.ip, flow.remote.port)

class RecentEvent(ApiModel):
    """One sampled retransmit."""

    time: datetime = Field(description="When the kernel saw it.")
    kind: Literal["retransmit", "synack"] = Field(description="retransmit (tcp_retransmit_skb) or synack (tcp_retransmit_synack).")
    family: IPFamily = Field(description="IPv4 or IPv6.")
    local: Endpoint = Field(description="The side that retransmitted.")
    remote: Endpoint = Field(description="The peer.")
    state: Optional[TCPState] = Field(None, description="TCP state at the retransmit.")


class PodCount(RatioModel):
    """Retransmits of one pod: those it sent (its node's topPods), or on the flows it is an end of."""

    RATIO_OF = ("retrans_segs", "out_segs")

    pod: str = Field(description="Pod name.")
    namespace: str = Field(description="Pod namespace.")
    node: Optional[str] = Field(None, description="Node the pod runs on.")
    retransmits: int = Field(0, ge=0, description="Retransmits (skb and SYN-ACK) this pod sent during the trace: its node's kernel counts them per local address, whatever its flow map evicts, and the agent adds each address's count to the pod owning it.")
    out_segs: Optional[int] = Field(None, ge=0, description="TCP segments the pod sent during the trace, retransmissions included (Tcp OutSegs of the pod's own network namespace, read by its node's agent through /proc/PID/net/snmp of a process in it: every connection of the pod, whatever the trace's filters). Absent for hostNetwork pods (they share the node's counters: the node's outSegs) and when the agent found no process in the pod's namespace.")
    retrans_segs: Optional[int] = Field(None, ge=0, description="TCP segments the pod retransmitted during the trace (Tcp RetransSegs, same counters). Segments sent while no agent ran (a restart) are in neither.")
    retrans_ratio: Optional[float] = Field(None, ge=0, description="retransSegs / outSegs: the share of the pod's segments that were retransmissions. Set from the two counters, never on its own.")


# Pod rows in a node report's topPods: every pod with a count, so a restarted agent resumes
# each. The kernel counts per local address in at most DEFAULT_OWNER_CAPACITY addresses, so a
# node has no more pods with counts unless addresses are reused by many pods in one trace;
# past it the least busy rows are left out. A row is about 150 bytes of JSON: a node with a
# few hundred pods adds tens of KB, this bound about 600 KB.
MAX_NODE_PODS = DEFAULT_OWNER_CAPACITY
MAX_REMOTES = 64   # remote addresses in a report's byRemote: the busiest, for the trace's path matrix


class RemoteCount(ApiModel):
    """Retransmits one node sent towards one remote address."""

    ip: str = Field(description="Remote address, canonical text.")
    retransmits: int = Field(0, ge=0, description="Retransmits (skb and SYN-ACK) towards it, over every flow the agent knows.")


class KernelCheck(ApiModel):
    """One line of the agent's kernel check (`retransmit-agent check`)."""

    name: str = Field(description="The requirement, e.g. tracefs, BPF permission, ring buffer.")
    status: Literal["ok", "degraded", "fail"] = Field(description="ok; degraded (counts unchanged, less detail); fail (the agent cannot count).")
    detail: str = Field(description="What the agent found.")
    fix: Optional[str] = Field(None, description="What to do, for degraded and failing lines.")


def add_counts(*counts: dict[str, int]) -> dict[str, int]:
    """Key-wise sum of count maps (byState, byCause), zeros left out, keys sorted."""
    total: dict[str, int] = {}
    for each in counts:
        for key, n in each.items():
            total[key] = total.get(key, 0) + n
    return {key: n for key, n in sorted(total.items()) if n}


def add_known(*values: Optional[int]) -> Optional[int]:
    """Sum of the values that are known; None when none is (the kernels cannot tell)."""
    known = [v for v in values if v is not None]
    return sum(known) if known else None


class NodeStatus(RatioModel):
    """What one node saw in one trace, in full: the spec of its RetransmitNodeReport, written
    only by that node's agent, and the agent's own restart state (never trimmed)."""

    RATIO_OF = ("retrans_segs", "out_segs")

    node: str = Field(description="The node this report is about (the agent's own: an admission policy checks it against the agent's token).")
    phase: Phase = Field(Phase.PENDING, description="Running while counting; Failed with a message when the node cannot trace.")
    retransmits: int = Field(0, ge=0, description="Every matched tcp_retransmit_skb event on this node, including flows evicted from the kernel map.")
    synack_retransmits: int = Field(0, ge=0, description="Every matched tcp_retransmit_synack event.")
    lost_events: int = Field(0, ge=0, description="Samples dropped by the rate limit or a full buffer; counts stay exact.")
    missed_events: Optional[int] = Field(None, ge=0, description="Tracepoint hits the kernel did not run this program for (another BPF program was running on that CPU: recursion protection); the true count may be higher by this much. Absent where the kernel cannot count them (before Linux 6.7).")
    failed_attempts: Optional[int] = Field(None, ge=0, description="Retransmits the kernel tried and could not send (e.g. its queue was full); in no other count. Absent where the kernel cannot tell (before Linux 6.17).")
    by_cause: ByCause
    out_segs: Optional[int] = Field(None, ge=0, description="TCP segments the node sent during the trace, retransmissions included (Tcp OutSegs of /proc/net/snmp in the node's own network namespace: the node's and its hostNetwork pods' connections, IPv4 and IPv6, every port, whatever the trace's filters). Absent when the agent cannot read it.")
    retrans_segs: Optional[int] = Field(None, ge=0, description="TCP segments the node retransmitted during the trace (Tcp RetransSegs, same counters). Segments sent while no agent ran (a restart) are in neither.")
    retrans_ratio: Optional[float] = Field(None, ge=0, description="retransSegs / outSegs: the share of the node's segments that were retransmissions. Set from the two counters, never on its own.")
    kernel_checks: list[KernelCheck] = Field(default_factory=list, description="The agent's kernel check at start: one line per requirement, why the node cannot trace or runs degraded.")
    flows: int = Field(0, ge=0, description="Distinct flows seen.")
    by_state: dict[str, int] = Field(default_factory=dict, description="Retransmits per TCP state on this node.",
                                     json_schema_extra=k8s_extra(x_kubernetes_map_type="atomic"))
    top_flows: list[Flow] = Field(default_factory=list, description="Busiest flows, at most spec.topFlows.")
    top_pods: list[PodCount] = Field(default_factory=list, max_length=MAX_NODE_PODS, description=f"Every local-side pod on this node that retransmitted, busiest first (not only spec.topFlows of them: a restarted agent resumes each), with its retransmits (tcp_retransmit_skb + synack, counted by the kernel per local address, whatever the flow map evicts; exact unless podCountsOverflow) and its own network namespace's segment counters (outSegs, retransSegs, retransRatio). At most {MAX_NODE_PODS}.")
    pod_counts_overflow: int = Field(0, ge=0, description=f"Retransmits (skb and SYN-ACK) in this node's totals but in no pod's count, because the kernel's per-address map was full (it holds {DEFAULT_OWNER_CAPACITY} local addresses, both families: far more than a node's pods). Nonzero: topPods undercounts the pods whose addresses did not fit.")
    recent_events: list[RecentEvent] = Field(default_factory=list, description="Most recent samples, at most spec.events.keep.")
    by_remote: list[RemoteCount] = Field(default_factory=list, max_length=MAX_REMOTES, description=f"Where this node's retransmits went: by remote address over every flow the agent knows, busiest first, at most {MAX_REMOTES} (the trace's path matrix names their nodes and zones).")
    last_report_time: Optional[datetime] = Field(None, description="When the agent last wrote this report (at least every few report intervals: the heartbeat).")
    kernel: Optional[str] = Field(None, description="Kernel release of the node.")
    agent_version: Optional[str] = Field(None, description="Version of the agent that wrote this entry.")
    message: Optional[str] = Field(None, description="What went wrong and how to fix it, when phase is Failed.")
    drops: Optional[int] = Field(None, ge=0, description="TCP packets of the traced flows this node's kernel dropped (skb:kfree_skb), inbound to and outbound from its traced addresses. Absent when the node does not count drops: kernel before 5.17 (no reason field), no BTF, or spec.drops false (kernelChecks says which).")
    drops_by_reason: Optional[dict[str, int]] = Field(None, description="drops by the kernel's reason (enum skb_drop_reason without SKB_DROP_REASON_, e.g. NETFILTER_DROP, TCP_OFO_DROP, SOCKET_RCVBUFF); exact. Absent when drops is.",
                                                      json_schema_extra=k8s_extra(x_kubernetes_map_type="atomic"))
    dropped_flows: Optional[list[DroppedFlow]] = Field(None, max_length=MAX_DROPPED_FLOWS, description=f"The flows with the most dropped packets on this node, at most {MAX_DROPPED_FLOWS}, each from this node's end: a receiver's inbound drops carry the reversed tuple of the sender's retransmitting flow.")
    socket_owners: Optional[Literal["cgroup", "address"]] = Field(None, description="How the agent tells who owns a local socket. cgroup: from the socket's cgroup (v2), read in the kernel once per new flow, so hostNetwork pods are named as pods and node processes by their systemd unit. address: from the local address alone, so hostNetwork pods and node processes all count as the node (kernelChecks says why cgroup is unavailable: no cgroup v2, no BTF).")
    needs_privileged: Optional[bool] = Field(None, description="True when the agent, not privileged, found it may not load BPF (its capabilities, the kernel's, or the kernel's answer EPERM) and a privileged agent may: phase is Failed and the message says why. In the operator's auto security mode a privileged agent then takes over this node for the trace.")


# Rows in status.nodes[]. The API server's CPU per status write grows with the stored object
# (python -m bench.status_writes: 500 rows cost this project's API server 98 ms of CPU per
# write, 100 rows 30 ms), and five traces write theirs every couple of seconds. Every node's report holds
# everything; the rows are the triage view: problems first, then the busiest.
MAX_NODE_ROWS = 100
MAX_ROW_MESSAGE = 200  # characters of a row's message; the report holds the whole message


MAX_UNCOVERED_EXAMPLES = 5  # node names each reason of summary.nodesNotCovered lists


class UncoveredNodes(ApiModel):
    """Linux nodes a trace does not reach, for one reason."""

    reason: Literal["NotSelected", "TaintNotTolerated", "AgentNotRunning"] = Field(
        description="NotSelected: spec.nodeSelector (or the chart's agent.nodeSelector) leaves the node out; "
                    "TaintNotTolerated: a NoSchedule or NoExecute taint the agents do not tolerate; "
                    "AgentNotRunning: the node should run an agent and none runs there (pending, crashing, "
                    "or not placed yet).")
    count: int = Field(ge=0, description="How many Linux nodes.")
    nodes: list[str] = Field(default_factory=list, max_length=MAX_UNCOVERED_EXAMPLES,
                             description=f"Some of them (at most {MAX_UNCOVERED_EXAMPLES}), by name.")
    detail: Optional[str] = Field(None, description="What keeps them out, e.g. the taints not tolerated, and the fix.")


MAX_PATHS = 20   # node pairs and zone pairs each in the summary, the busiest
MAX_DROP_ROWS = 10   # (node, reason) rows in summary.topDrops


class NodeDropCount(ApiModel):
    """TCP packets of the traced flows one node's kernel dropped for one reason."""

    node: str = Field(description="The node that dropped them.")
    reason: str = Field(description="The kernel's drop reason (enum skb_drop_reason without SKB_DROP_REASON_).")
    drops: int = Field(0, ge=0, description="Packets dropped.")


class PathCount(RatioModel):
    """Retransmits sent from one place to another: a node pair or a zone pair."""

    RATIO_OF = ("total_retrans", "data_segs_out")

    source: str = Field(description="The sending node (or its zone).")
    destination: str = Field(description="The receiving node (or its zone); 'outside' for addresses outside the cluster, 'unknown' for a Service address or an address no pod or node has.")
    retransmits: int = Field(0, ge=0, description="Retransmits (skb and SYN-ACK) from source to destination.")
    percent: int = Field(0, ge=0, le=100, description="Share of all the trace's retransmits, rounded down.")
    data_segs_out: Optional[int] = Field(None, ge=0, description="Data segments sent over their lives by the pair's connections that the source nodes' reports list with socket counters (their topFlows: connections that retransmitted, so the ratio is theirs, not the path's whole traffic). Absent when none carries them.")
    total_retrans: Optional[int] = Field(None, ge=0, description="Segments those same connections retransmitted over their lives.")
    retrans_ratio: Optional[float] = Field(None, ge=0, description="totalRetrans / dataSegsOut over those connections: about the loss rate on this path of the connections that lost anything. Set from the two sums, never on its own.")


MAX_PRIVILEGED_REASONS = 3  # reasons summary.privilegedNodes lists (the most common first)


class PrivilegedNodes(ApiModel):
    """Nodes whose agents run privileged (security mode auto), for one reason."""

    reason: str = Field(description="Why the agent there could not load BPF with capabilities alone, as that node's agent said.")
    count: int = Field(ge=0, description="How many nodes, for this reason.")
    nodes: list[str] = Field(default_factory=list, max_length=MAX_UNCOVERED_EXAMPLES,
                             description=f"Some of them (at most {MAX_UNCOVERED_EXAMPLES}), by name.")


class Summary(RatioModel):
    """The cluster-wide answer, aggregated by the operator from status.nodes[]."""

    RATIO_OF = ("retrans_segs", "out_segs")

    retransmits: int = Field(0, ge=0, description="tcp_retransmit_skb events on all nodes.")
    synack_retransmits: int = Field(0, ge=0, description="tcp_retransmit_synack events on all nodes.")
    lost_events: int = Field(0, ge=0, description="Event samples dropped on all nodes (counts stay exact).")
    missed_events: Optional[int] = Field(None, ge=0, description="Tracepoint hits the kernel did not run the program for on the nodes that can count them (another BPF program was running on that CPU: recursion protection); the true counts may be higher by up to this much. Absent when no node can count them (before Linux 6.7).")
    failed_attempts: Optional[int] = Field(None, ge=0, description="Retransmits the kernels tried and could not send, on the nodes that report them (Linux 6.17+); absent when none does.")
    by_cause: ByCause
    nodes_desired: int = Field(0, ge=0, description="Agents the DaemonSet wants.")
    nodes_reporting: int = Field(0, ge=0, description="Nodes whose agent reports counts: reports in phase Running written within the heartbeat bound (at completion: every report that counted).")
    nodes_not_listed: int = Field(0, ge=0, description=f"Nodes with a report that status.nodes[] leaves out to stay small (it lists at most {MAX_NODE_ROWS}, problems first, then the busiest); their reports hold everything.")
    nodes: Optional[str] = Field(None, description="nodesReporting/nodesDesired, e.g. '2/3': the Nodes column of kubectl get.")
    nodes_linux: Optional[int] = Field(None, ge=0, description="Linux nodes in the cluster (kubernetes.io/os=linux), while the trace runs.")
    nodes_not_covered: list[UncoveredNodes] = Field(default_factory=list, max_length=3, description="Linux nodes the trace does not reach, by reason; empty when it covers every one.")
    privileged_nodes: list[PrivilegedNodes] = Field(default_factory=list, max_length=MAX_PRIVILEGED_REASONS, description=f"Nodes whose agents run privileged because capabilities were not enough there (the operator's auto security mode), by reason, the {MAX_PRIVILEGED_REASONS} most common; empty when every agent runs with capabilities only (or the mode is explicit).")
    top_flows: list[Flow] = Field(default_factory=list, description="Busiest flows cluster-wide (at most spec.topFlows), each with its node; remote pods attributed from the operator's pod index.")
    top_pods: list[PodCount] = Field(default_factory=list, description="Pods by the retransmits they sent (the sum of the nodes' topPods, segment counters summed where known), busiest first, at most spec.topFlows.")
    top_services: list[ServiceCount] = Field(default_factory=list, description="Services as remote ends, by the retransmits of the nodes' top flows towards them, busiest first, at most spec.topFlows.")
    by_state: dict[str, int] = Field(default_factory=dict, description="Retransmits per TCP state on all nodes (atomic, as byCause).",
                                     json_schema_extra=k8s_extra(x_kubernetes_map_type="atomic"))
    out_segs: Optional[int] = Field(None, ge=0, description="TCP segments the traced nodes sent during the trace (their reports' outSegs summed, where known).")
    retrans_segs: Optional[int] = Field(None, ge=0, description="TCP segments they retransmitted (retransSegs summed over the same nodes).")
    retrans_ratio: Optional[float] = Field(None, ge=0, description="retransSegs / outSegs over the traced nodes. Set from the two sums, never on its own.")
    top_drops: list[NodeDropCount] = Field(default_factory=list, max_length=MAX_DROP_ROWS, description=f"Which traced nodes dropped the traced flows' packets and why (skb:kfree_skb reasons, Linux 5.17+), busiest first, at most {MAX_DROP_ROWS}; empty when none did or no node counts drops.")
    by_node_pair: list[PathCount] = Field(default_factory=list, max_length=MAX_PATHS, description=f"Retransmits by sending and receiving node (from the nodes' byRemote), busiest first, at most {MAX_PATHS}.")
    by_zone_pair: list[PathCount] = Field(default_factory=list, max_length=MAX_PATHS, description=f"The same by the nodes' topology.kubernetes.io/zone, busiest first, at most {MAX_PATHS}; empty when no node has a zone.")
    hot_path: Optional[str] = Field(None, description="The node or zone pair that holds most of the retransmits, when one does (e.g. '82% of retransmits went from zone a to zone b'); absent when none stands out.")


class Condition(ApiModel):
    """metav1.Condition."""

    type: Literal["Ready", "AgentsReady", "Degraded"] = Field(description="Ready (the summary), AgentsReady (every desired agent reports) or Degraded (a node failed).")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", description="CamelCase reason.")
    message: str = Field("", description="What it means and, when something is wrong, how to fix it.")
    last_transition_time: datetime = Field(description="When status last changed.")
    observed_generation: Optional[int] = Field(None, description="metadata.generation the condition was computed for.")


class NodeRow(ApiModel):
    """One node's row in the trace's status.nodes[]: the counts of its report, compact."""

    node: str = Field(description="Node name: the list-map key.")
    phase: Phase = Field(Phase.PENDING, description="The report's phase: Running while counting, Failed when the node cannot trace.")
    retransmits: int = Field(0, ge=0, description="The node's tcp_retransmit_skb events.")
    synack_retransmits: int = Field(0, ge=0, description="The node's tcp_retransmit_synack events.")
    lost_events: int = Field(0, ge=0, description="The node's dropped samples (counts stay exact).")
    retrans_ratio: Optional[float] = Field(None, ge=0, description="The node report's retransRatio: retransSegs / outSegs of the node's own network namespace during the trace.")
    last_report_time: Optional[datetime] = Field(None, description="When the node's agent last wrote its report.")
    reporting: bool = Field(False, description="The node counts as reporting: Running and written within the heartbeat bound.")
    departed: bool = Field(False, description="The node left the cluster or the trace's selector; its report keeps its final counts.")
    message: Optional[str] = Field(None, max_length=MAX_ROW_MESSAGE, description="What went wrong, shortened; the node's report (kubectl get rtreport -A -l retransmit.dev/node=NODE) holds it in full.")


class RetransmitTraceStatus(ApiModel):
    """Written by the operator only: phase, conditions, summary, times and the node rows,
    aggregated from the agents' RetransmitNodeReports."""

    phase: Optional[Phase] = Field(None, description="Pending, Running, Completed or Failed.")
    observed_generation: Optional[int] = Field(None, description="metadata.generation the operator last acted on.")
    start_time: Optional[datetime] = Field(None, description="When the agents' DaemonSet was created; the trace ends at startTime + spec.duration.")
    completion_time: Optional[datetime] = Field(None, description="When the trace completed.")
    conditions: list[Condition] = Field(default_factory=list, description="Ready, AgentsReady and Degraded.",
                                        json_schema_extra=k8s_extra(x_kubernetes_list_type="map", x_kubernetes_list_map_keys=["type"]))
    summary: Optional[Summary] = Field(None, description="The cluster-wide answer, aggregated by the operator.")
    nodes: list[NodeRow] = Field(default_factory=list, max_length=MAX_NODE_ROWS, description=f"One compact row per node (at most {MAX_NODE_ROWS}: failed, silent and departed nodes first, then the busiest; summary.nodesNotListed counts the rest). Each node's RetransmitNodeReport holds the details.",
                                 # Atomic: the operator alone writes the rows and replaces them whole. Keyed by
                                 # node, the server tracked every row's fields in managedFields (91 KB at 500
                                 # rows) and spent 2.8x the CPU on every status write.
                                 json_schema_extra=k8s_extra(x_kubernetes_list_type="atomic"))


class NodeReportStatus(ApiModel):
    """Written by the operator on a report: whether its node is still part of the trace."""

    departed: bool = Field(False, description="The node left the cluster or the trace's node selector (no agent pod of the trace runs there); the report keeps its final counts.")
    departed_time: Optional[datetime] = Field(None, description="When the operator first saw the node gone.")
