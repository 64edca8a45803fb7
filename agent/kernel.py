"""The kernel program's Python side: configure, attach, read counters, drain samples.

    program = RetransmitProgram.open(KernelConfig(ports=frozenset({443})))
    snapshot = program.snapshot()        # KernelSnapshot: exact totals, byState, flow_counters
    samples = program.drain_events()     # list[RecentEvent] since the last drain
    program.set_local_ips({"10.1.2.3"})  # live: the cluster agent follows its pods
    program.close()

Every problem that prevents tracing raises KernelProblem with one actionable line.
Beside it: kernelconfig.py (what to count, cflags), kernelinfo.py (what the kernel offers),
runs.py (merging per-CPU runs), bccerrors.py (compiler and verifier output to one line).
The C source is package data (retransmit_bpf); its layouts live in bpf/retransmit.h and
reach Python only through bcc's map types and table.event().
"""

from __future__ import annotations

import contextlib
import os
import ipaddress
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from retransmit_core.kernelvocab import TCP_STATE_NUMBERS, UNKNOWN_STATE
from retransmit_core.api import RecentEvent

from .flows import (
    AF_INET,
    AF_INET6,
    FlowCounters,
    SocketState,
    causes_by_name,
    decode_address,
    flow_counters,
    recent_event,
    state_name,
    wall_clock_offset_ns,
)
from .bccerrors import bcc_failure, stderr_captured
from .drops import DropSnapshot, DropSupport, probe_drops, read_drops
from .kernelconfig import FAMILY_BITS, LOCAL_NODE, LOCAL_SELECTED, KernelConfig, compile_flags, drops_counted, require_fitting_layout
from .kernelinfo import VMLINUX_BTF, KernelFeatures, misses_counted, probe_features
from .runs import FlowEntry, merge_pending_runs
from .segments import TcpSegments, read_tcp_segments
from .preflight import (
    KernelProblem,
    find_tracefs,
    require_kernel_headers,
    require_privileges,
    require_tracepoints,
)

__all__ = ["KernelConfig", "KernelProblem", "KernelSnapshot", "RetransmitProgram", "FlowCounters"]

DROP_PROBE = "kfree_skb"      # the drop program's probe name in _probe_stats and kernel_cost
MAX_PENDING_EVENTS = 10_000   # samples kept between drains; more are counted as lost


@dataclass(frozen=True)
class KernelSnapshot:
    """The kernel's counters at one moment, cumulative since the program was opened.

    Totals and by_state count every event that passed the filters, including flows the
    LRU maps evicted; `flow_counters` holds the flows still in the maps. lost_events counts samples
    dropped by the rate limit or a full buffer. failed_attempts: retransmits the kernel
    tried and failed (Linux 6.17+ reports them; they are in no other count). missed_events:
    tracepoint hits the kernel did not run the program for, because another BPF program
    was running on that CPU (every program on the tracepoint misses those alike). by_state includes SYN-ACK retransmits under
    SYN_RECV (their tracepoint has no state: a request socket is what `ss` calls SYN-RECV).
    """

    retransmits: int
    synack_retransmits: int
    lost_events: int
    sampled_events: int
    failed_attempts: Optional[int]     # None: the kernel cannot tell (no `err` field, before 6.17)
    missed_events: Optional[int]       # None: the kernel does not count them (before 6.7)
    by_state: dict[str, int]
    flow_counters: list[FlowCounters]
    by_cause: dict[str, int] = field(default_factory=dict)   # retransmits + SYN-ACKs per cause
    drops: Optional[DropSnapshot] = None   # None: the program counts no drops (drops.py: why not)
    taken_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    # The namespace's Tcp OutSegs and RetransSegs since the program started (the node's for
    # the agent, which has the host's network; every segment, not only the filters' flows).
    # None when /proc/net/snmp cannot be read.
    tcp_segments: Optional[TcpSegments] = None
    # Retransmits + SYN-ACK retransmits per local address (canonical text) since the program
    # started, whatever the flow maps evicted (the `owners` map plus pending runs): what
    # per-pod totals are summed from. A run moved into the map while it is read shows at the
    # next snapshot (it may lag, never counts twice).
    by_local_address: dict[str, int] = field(default_factory=dict)
    # The same per (local address, socket cgroup id): a node address's counts split by who
    # sent (hostNetwork pods, node processes). Cgroup 0 where none was read.
    by_local_owner: dict[tuple[str, int], int] = field(default_factory=dict)
    # Retransmits that no `owners` entry took because the map was full (owner_capacity
    # addresses): in the totals, in no address's count.
    owners_full: int = 0


def _socket_state(sock: Any) -> Optional[SocketState]:
    """A struct sock_info from a map value, None when the kernel read no socket."""
    if not sock.valid:
        return None
    segs = bool(sock.segs_valid)   # 0 without HAVE_SOCK_SEGS: absent, not zero
    return SocketState(srtt_us=sock.srtt_us, snd_cwnd=sock.snd_cwnd, packets_out=sock.packets_out,
                       retrans_out=sock.retrans_out, timeouts=sock.timeouts,
                       data_segs_out=sock.data_segs_out if segs else None,
                       total_retrans=sock.total_retrans if segs else None)


class RetransmitProgram:
    """The attached kernel program. Thread-safe; use open() to create one."""

    def __init__(self, bpf: Any, config: KernelConfig, features: KernelFeatures, tracefs: Path,
                 drops: Optional[DropSupport] = None) -> None:
        self._bpf = bpf
        self._config = config
        self.features = features
        self.uses_ringbuf = features.ringbuf
        self.tracefs = tracefs
        self._lock = threading.Lock()
        self._pending: deque[tuple] = deque()
        self._dropped_in_python = 0
        self._events_table = bpf[b"events"]
        self._local_ips: Optional[frozenset[str]] = None
        self._cgroups_enabled = False
        self._floors: dict[tuple, tuple[int, int]] = {}
        self._generation = 0
        self.drop_support = drops   # what the kernel offers for drops (None: not probed)
        self.counts_drops = drops_counted(config, drops)   # the kfree_skb probe is attached
        self._segments_at_start: Optional[TcpSegments] = None   # read when counting starts

    # ---------------------------------------------------------------- lifecycle

    @classmethod
    def open(cls, config: KernelConfig, tracefs: Optional[str] = None,
             ringbuf: Optional[bool] = None, jiffies64: Optional[bool] = None,
             btf: Optional[str] = VMLINUX_BTF, without: Iterable[str] = (),
             run_slots: Optional[int] = None, cgroups: bool = True) -> "RetransmitProgram":
        """Check the node, compile and attach the program, then start counting with `config`.

        tracefs: a tracefs mount to check instead of probing the usual places.
        ringbuf: None probes the kernel (BPF ring buffer when it can create one, else a
        perf buffer); True/False forces the choice (a perf buffer works on every kernel).
        jiffies64: None probes for bpf_jiffies64(); False reads the clock every event.
        btf: the kernel's BTF, for the socket fields behind each retransmit's cause; None or a
        missing file: causes are unknown, counts unchanged.
        cgroups: read each new flow's socket cgroup (where BTF gives the layout); False: the
        node has no cgroup v2 to name them by (features.cgroup None).
        without, run_slots: for bench/kernel_breakdown.py's cost per part only
        (kernelconfig.compile_flags).
        """
        require_privileges()  # first: without it tracefs looks empty
        path = find_tracefs(tracefs)
        require_tracepoints(path)
        require_kernel_headers()
        try:
            from bcc import BPF
        except ImportError:
            raise KernelProblem(
                "python module bcc is missing: install python3-bpfcc (Debian/Ubuntu) or python3-bcc (RHEL)"
            ) from None
        features = probe_features(path, ringbuf=ringbuf, jiffies64=jiffies64, btf_path=btf, cgroups=cgroups)
        require_fitting_layout(config, features)
        drops = probe_drops(path, btf) if config.drops else None
        source = resources.files("retransmit_bpf")
        with resources.as_file(source) as folder:
            cflags = compile_flags(config, folder, features, without, run_slots, drops)
            with stderr_captured() as output:
                try:
                    bpf = BPF(src_file=str(folder / "retransmit.bpf.c").encode(), cflags=cflags)
                except Exception as exc:  # bcc raises bare Exception for compile and load errors
                    failure = exc
                else:
                    failure = None
            if failure is not None:
                raise bcc_failure(failure, output)
        program = cls(bpf, config, features, path, drops)
        try:
            program._start()
        except Exception:
            bpf.cleanup()
            raise
        return program

    def _start(self) -> None:
        if self.uses_ringbuf:
            self._events_table.open_ring_buffer(self._on_event)
        else:
            self._events_table.open_perf_buffer(
                self._on_perf_event, page_cnt=self._config.ring_pages, lost_cb=lambda lost: None,
                wakeup_events=64,
            )
        c = self._config
        self._fill(self._bpf[b"ports"], (self._bpf[b"ports"].Key(p) for p in c.ports))
        self._fill_cidrs(c.remote_cidrs)
        self._write_local_ips(c.local_ips or frozenset())
        self._local_ips = c.local_ips
        self._write_config()  # last: families != 0 is what starts counting
        self._segments_at_start = read_tcp_segments()

    def close(self) -> None:
        """Detach the program and free its maps."""
        with self._lock:
            if self._bpf is not None:
                self._events_table = None  # bcc closes perf buffers when the last reference goes
                self._bpf.cleanup()
                self._bpf = None

    def __enter__(self) -> "RetransmitProgram":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- configuration maps

    def _write_config(self) -> None:
        c = self._config
        table = self._bpf[b"config"]
        leaf = table.Leaf()
        leaf.families = sum(FAMILY_BITS[f] for f in c.families)
        leaf.states = sum(1 << TCP_STATE_NUMBERS[s] for s in c.states)
        leaf.ports_enabled = int(bool(c.ports))
        leaf.cidrs_enabled = int(bool(c.remote_cidrs))
        leaf.local_ips_enabled = int(self._local_ips is not None)
        leaf.cgroups_enabled = int(self._cgroups_enabled)
        leaf.max_per_second = c.samples_per_second
        self._generation += 1
        leaf.generation = self._generation
        table[table.Key(0)] = leaf

    @staticmethod
    def _fill(table: Any, keys: Iterable[Any]) -> None:
        for key in keys:
            table[key] = table.Leaf(1)

    def _fill_cidrs(self, cidrs: Iterable[str]) -> None:
        for text in cidrs:
            net = ipaddress.ip_network(text, strict=False)
            table = self._bpf[b"cidrs4" if net.version == 4 else b"cidrs6"]
            key = table.Key()
            key.prefixlen = net.prefixlen
            for i, byte in enumerate(net.network_address.packed):
                key.addr[i] = byte
            table[key] = table.Leaf(1)

    def _local_keys(self, ips: Iterable[str]) -> tuple[list[Any], list[Any]]:
        t4, t6 = self._bpf[b"local4"], self._bpf[b"local6"]
        keys4, keys6 = [], []
        for ip in ips:
            packed = ipaddress.ip_address(ip).packed
            if len(packed) == 4:
                keys4.append(t4.Key(int.from_bytes(packed, sys.byteorder)))  # u32 holding network-order bytes
            else:
                key = t6.Key()
                for i, byte in enumerate(packed):
                    key.addr[i] = byte
                keys6.append(key)
        return keys4, keys6

    def _write_local_ips(self, ips: frozenset[str], node_ips: frozenset[str] = frozenset()) -> int:
        """Make local4/local6 hold `ips` (LOCAL_SELECTED) and `node_ips` (LOCAL_NODE: pass when
        the socket's cgroup is selected), as many per family as the maps hold; returns how many
        did not fit. Stale entries go first, so the room they free serves the new ones; which
        addresses fit is stable (sorted, selected ones first), so a pod does not flap in and
        out as others come."""
        left_out = 0
        keep4, keep6 = self._local_keys(ips)
        node4, node6 = self._local_keys(node_ips - ips)
        for table, keep, node in ((self._bpf[b"local4"], keep4, node4), (self._bpf[b"local6"], keep6, node6)):
            ordered = [(k, LOCAL_SELECTED) for k in sorted(keep, key=bytes)]
            ordered += [(k, LOCAL_NODE) for k in sorted(node, key=bytes)]
            fitting = ordered[: self._config.filter_capacity]
            left_out += len(ordered) - len(fitting)
            wanted = {bytes(k): (k, value) for k, value in fitting}
            for key in list(table.keys()):
                if bytes(key) not in wanted:
                    with contextlib.suppress(KeyError):
                        del table[key]
            for key, value in wanted.values():
                table[key] = table.Leaf(value)
        return left_out

    def _write_cgroups(self, cgroups: frozenset[int]) -> int:
        """Make `cgroups` hold the selected cgroup ids; returns how many did not fit."""
        table = self._bpf[b"cgroups"]
        fitting = sorted(cgroups)[: self._config.filter_capacity]
        for key in list(table.keys()):
            if key.value not in cgroups:
                with contextlib.suppress(KeyError):
                    del table[key]
        for cgroup in fitting:
            table[table.Key(cgroup)] = table.Leaf(1)
        return len(cgroups) - len(fitting)

    @property
    def reads_cgroups(self) -> bool:
        """Each new flow carries its socket's cgroup id (the node's BTF gave the layout)."""
        return self.features.cgroup is not None

    def set_local_ips(self, ips: Optional[Iterable[str]], node_ips: Iterable[str] = (),
                      cgroups: Optional[Iterable[int]] = None) -> int:
        """Count only flows whose local address is in `ips` (None: any local address), and,
        when `cgroups` holds ids and the program reads sockets' cgroups, flows from a node
        address in `node_ips` whose socket's cgroup is in `cgroups` (hostNetwork pods).

        Takes effect at once, without reloading; an empty set counts nothing. Returns how many
        addresses and cgroup ids did not fit the filter maps (KernelConfig.filter_capacity per
        family, and for cgroups): their flows are not counted, and the caller says so.
        """
        new = None if ips is None else frozenset(str(ipaddress.ip_address(ip)) for ip in ips)
        with self._lock:
            if self._bpf is None:
                return 0
            if new is None:
                self._local_ips = None
                self._cgroups_enabled = False
                self._write_config()
                self._write_cgroups(frozenset())
                return self._write_local_ips(frozenset())
            by_cgroup = bool(cgroups) and self.reads_cgroups   # no cgroup selected: node addresses never pass
            nodes = frozenset(str(ipaddress.ip_address(ip)) for ip in node_ips) if by_cgroup else frozenset()
            left_out = self._write_local_ips(new, nodes)
            left_out += self._write_cgroups(frozenset(cgroups) if by_cgroup else frozenset())
            self._local_ips = new
            self._cgroups_enabled = by_cgroup
            self._write_config()
            return left_out

    @property
    def config(self) -> KernelConfig:
        return self._config

    # ---------------------------------------------------------------- reading

    def snapshot(self) -> KernelSnapshot:
        """Exact totals, retransmits per state, and every flow still in the maps."""
        with self._lock:
            if self._bpf is None:
                raise KernelProblem("the kernel program is closed")
            offset = wall_clock_offset_ns()
            per_cpu = self._bpf[b"totals"][0]
            retransmits = synack = lost = sampled = failed = owners_full = 0
            states = [0] * len(per_cpu[0].by_state)
            causes = [0] * len(per_cpu[0].by_cause)
            for cpu in per_cpu:
                for i, n in enumerate(cpu.by_cause):
                    causes[i] += n
                retransmits += cpu.retransmits
                synack += cpu.synack_retransmits
                lost += cpu.lost
                sampled += cpu.sampled
                failed += cpu.failed
                owners_full += cpu.owners_full
                for i, n in enumerate(cpu.by_state):
                    states[i] += n
            # The maps before the runs: a run the kernel moves into them in between is missed
            # by this snapshot (it lags one snapshot, never counts twice).
            by_owner = self._read_owners()
            entries = self._read_flow_entries()
            runs = self._read_runs()
            flows = list(self._merged_flows(entries, runs, offset))
            for key, run in runs:
                owner = (decode_address(key[0], key[1]), run.cgroup)
                by_owner[owner] = by_owner.get(owner, 0) + run.retransmits
            owners: dict[str, int] = {}
            for (address, _cgroup), n in by_owner.items():
                owners[address] = owners.get(address, 0) + n
            lost += self._dropped_in_python
            probes = self._probe_stats()
            missed = sum(f.get("recursion_misses", 0) for name, f in probes.items()
                         if name != DROP_PROBE)   # kfree_skb's misses are no retransmits missed
            drops = read_drops(self._bpf, self.drop_support.reasons,
                               probes.get(DROP_PROBE, {}).get("recursion_misses", 0)) if self.counts_drops else None
        by_state = {}
        for number, n in enumerate(states):
            if n:
                by_state[state_name(number) or UNKNOWN_STATE] = n
        return KernelSnapshot(
            retransmits=retransmits, synack_retransmits=synack, lost_events=lost,
            sampled_events=sampled, flow_counters=flows, by_state=by_state,
            failed_attempts=failed if self.features.layout.has("err") else None,
            missed_events=missed if misses_counted(os.uname().release) else None,
            by_cause=causes_by_name(causes),
            drops=drops,
            tcp_segments=self._segments_since_start(),
            by_local_address=owners,
            by_local_owner=by_owner,
            owners_full=owners_full,
        )

    def _segments_since_start(self) -> Optional[TcpSegments]:
        now = read_tcp_segments()
        return now.since(self._segments_at_start) if now and self._segments_at_start else None

    def _read_owners(self) -> dict[tuple[str, int], int]:
        """The `owners` map: retransmits + SYN-ACK retransmits per (local address, cgroup id)."""
        counts: dict[tuple[str, int], int] = {}
        for key, value in self._entries(self._bpf[b"owners"]):
            size = 4 if key.family == AF_INET else 16   # struct owner_key: IPv4 in the first 4 bytes
            owner = (decode_address(key.family, bytes(key.addr)[:size]), key.cgroup)
            counts[owner] = counts.get(owner, 0) + value.retransmits + value.synack_retransmits
        return counts

    def _read_runs(self) -> list[tuple[tuple, FlowEntry]]:
        """The runs still pending on each CPU (see struct run), keyed as _raw_key keys flows."""
        runs: list[tuple[tuple, FlowEntry]] = []
        table = self._bpf[b"runs"]
        for run in (run for slot in range(len(table)) for run in table[slot]):   # every slot of every CPU
            if run.retransmits:
                size = 4 if run.key.family == AF_INET else 16   # struct flow_key: IPv4 in the first 4 bytes
                key = (run.key.family, bytes(run.key.saddr)[:size], bytes(run.key.daddr)[:size],
                       run.key.sport, run.key.dport)
                runs.append((key, FlowEntry(
                    run.retransmits, 0, run.first_ns, run.last_ns, run.last_state,
                    tuple(run.by_cause), _socket_state(run.sock), run.cgroup)))
        return runs

    def _read_flow_entries(self) -> dict[tuple, FlowEntry]:
        """The flow maps' entries, keyed by _raw_key."""
        entries: dict[tuple, FlowEntry] = {}
        for family, name in ((AF_INET, b"flows4"), (AF_INET6, b"flows6")):
            for key, stats in self._entries(self._bpf[name]):
                entries[self._raw_key(family, key)] = FlowEntry(
                    stats.retransmits, stats.synack_retransmits, stats.first_ns, stats.last_ns, stats.last_state,
                    tuple(stats.by_cause), _socket_state(stats.sock), stats.cgroup)
        return entries

    def _merged_flows(self, entries: dict[tuple, FlowEntry], runs: list[tuple[tuple, FlowEntry]],
                      offset: int) -> Iterator[FlowCounters]:
        """Flow map entries plus the runs still pending on each CPU (read after the maps), each
        flow's counts floored: a run that lagged one snapshot never makes a count go back."""
        merged, self._floors = merge_pending_runs(entries, runs, self._floors)
        for (family, saddr, daddr, sport, dport), e in merged.items():
            yield flow_counters(family, saddr, daddr, sport, dport, e.retransmits, e.synack_retransmits,
                                e.first_ns, e.last_ns, e.last_state, offset, e.by_cause, e.socket, e.cgroup)

    @staticmethod
    def _entries(table: Any) -> Iterable[tuple[Any, Any]]:
        """All (key, value) pairs: one batched syscall series on Linux 5.6+, else one by one."""
        try:
            return list(table.items_lookup_batch())
        except Exception:  # noqa: BLE001 - older kernels: EINVAL/ENOTSUPP from the batch call
            return list(table.items())

    @staticmethod
    def _raw_key(family: int, key: Any) -> tuple:
        if family == AF_INET:
            saddr = key.saddr.to_bytes(4, sys.byteorder)
            daddr = key.daddr.to_bytes(4, sys.byteorder)
        else:
            saddr, daddr = bytes(key.saddr), bytes(key.daddr)
        return (family, saddr, daddr, key.sport, key.dport)

    def _probe_stats(self) -> dict[str, dict[str, int]]:
        """Per probe, the kernel's counters for the program (/proc/self/fdinfo)."""
        out = {}
        for name, fn in self._bpf.funcs.items():
            fields = {}
            with contextlib.suppress(OSError, ValueError):
                for line in Path(f"/proc/self/fdinfo/{fn.fd}").read_text().splitlines():
                    key, _, value = line.partition(":")
                    if key.strip() in ("run_time_ns", "run_cnt", "recursion_misses"):
                        fields[key.strip()] = int(value)
            probe = (name.decode() if isinstance(name, bytes) else name).rsplit("__", 1)[-1]
            out[probe] = fields
        return out

    def instruction_counts(self) -> dict[str, int]:
        """Per probe, the program's size in BPF instructions (kernels before 5.2 load at most
        kernelinfo.OLD_KERNEL_MAX_INSNS)."""
        with self._lock:
            if self._bpf is None:
                return {}
            names = [b"tracepoint__tcp__tcp_retransmit_skb", b"tracepoint__tcp__tcp_retransmit_synack"]
            names += [b"tracepoint__skb__kfree_skb"] if self.counts_drops else []
            return {name.decode().rsplit("__", 1)[-1]: len(self._bpf.dump_func(name)) // 8 for name in names}

    def kernel_cost(self) -> dict[str, tuple[int, int]]:
        """Per probe: (run_time_ns, run_cnt) from the kernel's BPF statistics.

        Both stay 0 unless `sysctl kernel.bpf_stats_enabled=1`; for overhead measurements.
        """
        with self._lock:
            if self._bpf is None:
                return {}
            stats = self._probe_stats()
        return {probe: (f.get("run_time_ns", 0), f.get("run_cnt", 0)) for probe, f in stats.items()}

    # ---------------------------------------------------------------- samples

    def _on_event(self, _ctx: Any, data: Any, _size: int) -> int:
        e = self._events_table.event(data)
        if len(self._pending) >= MAX_PENDING_EVENTS:
            self._dropped_in_python += 1
        else:
            self._pending.append((e.ts_ns, e.family, e.kind, e.state, e.sport, e.dport,
                                  bytes(e.saddr), bytes(e.daddr)))
        return 0

    def _on_perf_event(self, _cpu: int, data: Any, size: int) -> None:
        self._on_event(None, data, size)

    def drain_events(self) -> list[RecentEvent]:
        """Samples that arrived since the last call, oldest first.

        The program submits without waking user space; this reads the buffer on the
        caller's timer. Call it at least every few seconds so the buffer does not fill.
        """
        with self._lock:
            if self._bpf is None:
                return []
            if self.uses_ringbuf:
                self._bpf.ring_buffer_consume()
            else:
                self._bpf.perf_buffer_consume()
            raw = list(self._pending)
            self._pending.clear()
        offset = wall_clock_offset_ns()
        return [recent_event(*fields, offset_ns=offset) for fields in raw]
