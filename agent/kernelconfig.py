"""What the kernel program is asked to count (KernelConfig) and how it is compiled for this
kernel: the run-time half goes into maps, the compile-time half into cflags."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from retransmit_core.kernelvocab import (
    DEFAULT_FILTER_CAPACITY,
    DEFAULT_FLOW_CAPACITY,
    DEFAULT_OWNER_CAPACITY,
    DEFAULT_RING_PAGES,
    DEFAULT_SAMPLES_PER_SECOND,
    RETRANSMIT_CAUSES,
    SOCKET_READ_INTERVAL_MS,
    TCP_STATE_NUMBERS,
    TCP_STATES,
)
from retransmit_core.api import RetransmitTraceSpec

from .flows import AF_INET, AF_INET6, KIND_RETRANSMIT, KIND_SYNACK

from .drops import DropSupport, drop_defines
from .kernelinfo import KernelFeatures
from .preflight import KernelProblem

FAMILY_BITS = {"IPv4": 1, "IPv6": 2}
# local4/local6 values: a selected pod's own address; a node address, kept when the socket's
# cgroup is in the `cgroups` map (hostNetwork pods).
LOCAL_SELECTED, LOCAL_NODE = 1, 2


@dataclass(frozen=True)
class KernelConfig:
    """What the kernel program counts. Empty sets mean "no restriction".

    families: "IPv4"/"IPv6"; ports: local or remote port; remote_cidrs: CIDR strings;
    states: kernel state names without TCP_; local_ips: None = no local-address filter,
    else only flows whose local address is in the set (an empty set matches nothing);
    samples_per_second: sampled events sent to user space (0 = none); flow_capacity:
    entries per family in the LRU flow maps; ring_pages: ring buffer size (power of two);
    filter_capacity: entries per family in the local-IP and remote-CIDR filter maps;
    owner_capacity: local addresses (both families) in the per-address map behind per-pod totals.
    """

    families: frozenset[str] = frozenset(FAMILY_BITS)
    ports: frozenset[int] = frozenset()
    remote_cidrs: tuple[str, ...] = ()
    states: frozenset[str] = frozenset()
    local_ips: Optional[frozenset[str]] = None
    samples_per_second: int = DEFAULT_SAMPLES_PER_SECOND
    flow_capacity: int = DEFAULT_FLOW_CAPACITY
    ring_pages: int = DEFAULT_RING_PAGES
    filter_capacity: int = DEFAULT_FILTER_CAPACITY
    owner_capacity: int = DEFAULT_OWNER_CAPACITY
    drops: bool = True   # also count drops by reason where the kernel can (drops.py); False: never

    def __post_init__(self) -> None:
        if not self.families or not set(self.families) <= set(FAMILY_BITS):
            raise ValueError(f"IP families {', '.join(sorted(self.families)) or 'none'}: use IPv4, IPv6 or both")
        for port in self.ports:
            if not 1 <= port <= 65535:
                raise ValueError(f"port {port} is outside 1-65535")
        for cidr in self.remote_cidrs:
            ipaddress.ip_network(cidr, strict=False)  # ValueError names the value
        unknown = set(self.states) - set(TCP_STATES)
        if unknown:
            raise ValueError(f"unknown TCP states {', '.join(sorted(unknown))}: use {', '.join(TCP_STATES)}")
        for ip in self.local_ips or ():
            ipaddress.ip_address(ip)
        if self.samples_per_second < 0:
            raise ValueError("samples_per_second must be 0 or more")
        if self.filter_capacity < 1:
            raise ValueError("filter_capacity must be at least 1")
        if self.flow_capacity < 1:
            raise ValueError("flow_capacity must be at least 1")
        if self.owner_capacity < 1:
            raise ValueError("owner_capacity must be at least 1")
        if self.ring_pages < 1 or self.ring_pages & (self.ring_pages - 1):
            raise ValueError(f"ring_pages {self.ring_pages} is not a power of two")

    @classmethod
    def from_spec(cls, spec: RetransmitTraceSpec, local_ips: Optional[Iterable[str]] = None) -> "KernelConfig":
        """The kernel configuration a trace spec asks for (spec.filter, spec.events)."""
        f = spec.filter
        return cls(
            families=frozenset(str(getattr(x, "value", x)) for x in f.ip_families),
            ports=frozenset(f.ports),
            remote_cidrs=tuple(f.remote_cidrs),
            states=frozenset(str(getattr(x, "value", x)) for x in f.states),
            local_ips=None if local_ips is None else frozenset(local_ips),
            samples_per_second=spec.events.max_per_second,
            drops=spec.drops,
        )


def program_defines() -> dict[str, int]:
    """The constants the program shares with Python, defined once here (as -D flags)."""
    return {
        "SOCK_READ_INTERVAL_NS": SOCKET_READ_INTERVAL_MS * 1_000_000,
        "AF_INET_": AF_INET, "AF_INET6_": AF_INET6,
        "FAMILY_IPV4": FAMILY_BITS["IPv4"], "FAMILY_IPV6": FAMILY_BITS["IPv6"],
        "LOCAL_SELECTED": LOCAL_SELECTED, "LOCAL_NODE": LOCAL_NODE,
        "KIND_RETRANSMIT": KIND_RETRANSMIT, "KIND_SYNACK": KIND_SYNACK,
        "TCP_SYN_SENT_": TCP_STATE_NUMBERS["SYN_SENT"], "TCP_SYN_RECV_": TCP_STATE_NUMBERS["SYN_RECV"],
        **{f"CAUSE_{name.upper()}": index for index, name in enumerate(RETRANSMIT_CAUSES)},
    }


# Parts of the program that bench/kernel_breakdown.py compiles out (-DWITHOUT_<PART>) to
# price each one in kernel time per event; the agent always compiles every part.
PROGRAM_PARTS = ("filters", "flows", "samples", "sock_stats")


def compile_flags(config: KernelConfig, include: Path, features: KernelFeatures,
                  without: Iterable[str] = (), run_slots: Optional[int] = None,
                  drops: Optional[DropSupport] = None) -> list[str]:
    """cflags for retransmit.bpf.c: the compile-time half of the configuration.

    For the cost breakdown only: `without` leaves PROGRAM_PARTS out (the result no longer
    counts what the agent promises); `run_slots` replaces the program's RUN_SLOTS (pending
    runs per CPU, a power of two; more than 2 lets more flows than flow_capacity show).
    drops: what the kernel offers for counting drops (drops.probe_drops); None: no drops."""
    without = tuple(without)
    unknown = set(without) - set(PROGRAM_PARTS)
    if unknown:
        raise ValueError(f"unknown program parts {', '.join(sorted(unknown))}: use {', '.join(PROGRAM_PARTS)}")
    if run_slots is not None and (run_slots < 1 or run_slots & (run_slots - 1)):
        raise ValueError(f"run_slots {run_slots} is not a power of two")
    return [
        f"-I{include}",
        f"-DFLOW_CAPACITY={config.flow_capacity}",
        f"-DRINGBUF_PAGES={config.ring_pages}",
        f"-DFILTER_CAPACITY={config.filter_capacity}",
        f"-DOWNER_CAPACITY={config.owner_capacity}",
    ] + features.switches() + [f"-D{name}={value}" for name, value in program_defines().items()] + [
        f"-DWITHOUT_{part.upper()}" for part in without] + ([f"-DRUN_SLOTS={run_slots}"] if run_slots else []) + [
        f"-D{name}={value}" for name, value in drop_defines_for(config, drops).items()]


def require_fitting_layout(config: KernelConfig, features: KernelFeatures) -> None:
    """The kernel's tracepoints have what the program and `config` need, else KernelProblem."""
    missing = features.layout.missing()
    if missing:
        raise KernelProblem(
            f"the tcp tracepoints lack fields every kernel since 4.15 has ({', '.join(missing)}): "
            "this kernel's tracepoints are patched; report its format files to the project")
    if config.states and not features.layout.has("state"):
        raise KernelProblem(
            f"a TCP state filter ({', '.join(sorted(config.states))}) needs the `state` field of "
            f"tcp:tcp_retransmit_skb, which Linux {os.uname().release} does not have (added in 5.0): "
            "remove the states filter (spec.filter.states / --state); retransmits are counted under UNKNOWN")


def drops_counted(config: KernelConfig, drops: Optional[DropSupport]) -> bool:
    """The program counts drops: the trace wants them and the kernel can (drops.probe_drops)."""
    return config.drops and drops is not None and drops.available


def drop_defines_for(config: KernelConfig, drops: Optional[DropSupport]) -> dict[str, int]:
    """bpf/drops.h's -D constants when the program counts drops, else none (no kfree_skb probe)."""
    return drop_defines(drops) if drops_counted(config, drops) else {}
