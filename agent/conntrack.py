"""Service backends from the node's conntrack table: the pod (address and port) that kube-proxy
translated a flow's Service address to.

With kube-proxy (iptables, nftables or IPVS) a client's socket stays addressed to the
ClusterIP (or the NodePort) it dialled, so the tracepoint reports that address. The DNAT to
a backend happens in the node's (host) network namespace, as the packet enters it from the
pod's veth (or leaves the host's own output path), and the node's conntrack table holds the
translation while the connection lives: original tuple client -> Service address, reply
tuple backend -> client. Why not the skb's own conntrack entry, read in the kernel: the
tracepoint fires in the retransmitting socket's namespace (a pod's), on an skb that has not
been through the host's NAT yet; whatever entry it carries there is the untranslated one.

The agent runs with hostNetwork, so /proc/net/nf_conntrack is the node's table (both IP
families in one file); the host's /proc (mounted read-only for podsegments.py) is the
fall-back, /host/proc/1/net/nf_conntrack. Reading it needs the file's permission (root) and
CONFIG_NF_CONNTRACK_PROCFS; without either no flow gets a backend, and the log says why once.

How often, and what is remembered (`ServiceBackends`):
- a flow's answer is looked up once and then remembered: its backend, or that it has none (its
  entry shows no translation, or its local end is the backend's side: the reply's source).
  Entries vanish when connections close, so the report keeps what was found: it never flips;
- the table is read only when a report lists a flow without an answer, and at most once per
  report period; a flow not found in LOOKUPS_PER_FLOW reads (its connection closed, or its
  traffic never passed the host's conntrack) is given up on: it has no backend;
- at most REMEMBERED_FLOWS answers are kept, least recently reported first out. A report lists
  far fewer flows (topFlows), and each report refreshes its own, so they are never the ones
  forgotten.
"""

from __future__ import annotations

import ipaddress
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from retransmit_core.api import Backend, Flow, FlowTuple, NodeStatus, flow_tuple
from retransmit_core.podindex import canonical_ip

from .podsegments import host_proc

log = logging.getLogger(__name__)

REMEMBERED_FLOWS = 16384   # flows whose answer (a backend or none) is kept
LOOKUPS_PER_FLOW = 3       # table reads that may miss a flow before it is given up on
TABLE = Path("/proc/net/nf_conntrack")



# ---------------------------------------------------------------- pure: the table's lines

@dataclass(frozen=True)
class Tuple:
    """One direction of a conntrack entry, canonical addresses."""

    src: str
    dst: str
    sport: int
    dport: int


@dataclass(frozen=True)
class Entry:
    """A TCP entry of /proc/net/nf_conntrack: what the first packet was (original) and what
    the answer is expected to look like (reply). Translated: reply.src is not original.dst."""

    family: str          # "IPv4" or "IPv6"
    original: Tuple
    reply: Tuple

    @property
    def translated_to(self) -> Optional[tuple[str, int]]:
        """Where the original destination was translated to (DNAT), None when it was not."""
        if (self.reply.src, self.reply.sport) == (self.original.dst, self.original.dport):
            return None
        return self.reply.src, self.reply.sport


_FAMILIES = {"ipv4": "IPv4", "ipv6": "IPv6"}


def _tuples(fields: list[str]) -> Optional[tuple[list[str], list[str]]]:
    """The raw src, dst, sport, dport values of both directions, in the order the kernel
    prints them (each direction's four keys in a row; counters, [UNREPLIED] and the like
    may stand between them)."""
    found: list[str] = []
    for field in fields:
        key, sep, value = field.partition("=")
        if sep and key in ("src", "dst", "sport", "dport"):
            if key != ("src", "dst", "sport", "dport")[len(found) % 4]:
                return None
            found.append(value)
            if len(found) == 8:
                return found[:4], found[4:]
    return None


def parse_line(line: str) -> Optional[Entry]:
    """One line of the table, or None for anything but a well-formed TCP entry.

    ipv4     2 tcp      6 431999 ESTABLISHED src=198.18.1.2 dst=198.19.0.10 sport=43210 dport=80 \
        src=198.18.2.3 dst=198.18.1.2 sport=5201 dport=43210 [ASSURED] mark=0 zone=0 use=2
    (IPv6 addresses as the kernel's %pI6: eight groups of four hex digits.)"""
    fields = line.split()
    if len(fields) < 14 or fields[2] != "tcp" or fields[0] not in _FAMILIES:
        return None
    raw = _tuples(fields[5:])
    if raw is None:
        return None
    try:
        original, reply = (Tuple(canonical_ip(a) or "", canonical_ip(b) or "", int(c), int(d)) for a, b, c, d in raw)
    except ValueError:
        return None
    if not (original.src and original.dst and reply.src and reply.dst):
        return None
    return Entry(_FAMILIES[fields[0]], original, reply)


def _as_printed(ip: str) -> str:
    """An address as the table prints it: IPv4 dotted, IPv6 in eight full groups (%pI6)."""
    address = ipaddress.ip_address(ip)
    return address.exploded if address.version == 6 else str(address)


@dataclass(frozen=True)
class Answer:
    """What the table says about one flow: its backend (None: no translation)."""

    backend: Optional[Backend]


NO_BACKEND = Answer(None)


def find_backends(lines: Iterable[str], flows: Iterable[FlowTuple]) -> dict[FlowTuple, Answer]:
    """The answer for each of `flows` that the table holds:
    - a flow whose own tuple is an entry's original (it opened the connection, from this
      node): translated -> its backend; not translated -> no backend;
    - a flow whose local end is an entry's reply source, towards the original source (the
      accepting side, a backend itself): no backend.
    Flows the table does not hold are left out. One pass; a line is split only when its
    original source (address and port) is one of the flows' ends, so the cost is that of
    reading the table for the lines that cannot matter."""
    by_source: dict[str, list[tuple[FlowTuple, bool]]] = {}   # "src=A sport=P" -> (flow, opened it)
    for key in flows:
        _family, lip, lport, rip, rport = key
        try:
            local, remote = _as_printed(lip), _as_printed(rip)
        except ValueError:
            continue
        by_source.setdefault(f"src={local} sport={lport}", []).append((key, True))
        by_source.setdefault(f"src={remote} sport={rport}", []).append((key, False))
    found: dict[FlowTuple, Answer] = {}
    if not by_source:
        return found
    for line in lines:
        # The original tuple's src and sport are fields 6 and 8 of a TCP line ("src=... dst=...
        # sport=..."): a cheap slice decides most lines.
        start = line.find(" src=")
        if start < 0:
            continue
        dst = line.find(" dst=", start + 5)
        sport = line.find(" sport=", dst + 5)
        end = line.find(" ", sport + 7)
        if dst < 0 or sport < 0 or end < 0:
            continue
        candidates = by_source.get(line[start + 1:dst] + line[sport:end])
        if candidates is None:
            continue
        entry = parse_line(line)
        if entry is None:
            continue
        for key, opened in candidates:
            _family, lip, lport, rip, rport = key
            if opened and (entry.original.dst, entry.original.dport) == (rip, rport):
                target = entry.translated_to
                found[key] = NO_BACKEND if target is None else Answer(Backend(ip=target[0], port=target[1]))
            elif not opened and (entry.reply.src, entry.reply.sport) == (lip, lport):
                found[key] = NO_BACKEND
    return found


# ---------------------------------------------------------------- I/O: the node's table

def table_paths() -> tuple[Path, ...]:
    """The node's table: the agent's own namespace (hostNetwork: the node's), else the host's
    init process' through the host's /proc."""
    return TABLE, host_proc() / "1" / "net" / "nf_conntrack"


def read_table(paths: Optional[Iterable[Path]] = None) -> Iterator[str]:
    """The table's lines, streamed (100,000 entries are about 25 MB of text). OSError when no
    path can be read: the last one's."""
    error: Optional[OSError] = None
    for path in paths or table_paths():
        try:
            handle = open(path, encoding="ascii", errors="replace")
        except OSError as exc:
            error = exc
            continue
        with handle:
            yield from handle
        return
    raise error or FileNotFoundError(str(TABLE))


# ---------------------------------------------------------------- the agent's memory

class ServiceBackends:
    """Each reported flow's Service backend, looked up in the node's conntrack table as the
    module's docstring says. `named(entry, now, period)` is the report with them set."""

    def __init__(self, read: Callable[[], Iterable[str]] = read_table, capacity: int = REMEMBERED_FLOWS,
                 lookups: int = LOOKUPS_PER_FLOW) -> None:
        self.read = read
        self.capacity = capacity
        self.lookups = lookups
        self.answers: OrderedDict[FlowTuple, Optional[Backend]] = OrderedDict()
        self.misses: OrderedDict[FlowTuple, int] = OrderedDict()
        self.read_at: Optional[float] = None
        self.reads = 0              # table reads so far (for tests and the log)
        self.problem: Optional[str] = None   # why the table could not be read, when it could not

    def named(self, entry: NodeStatus, now: float, period: float, resumed: Iterable[Flow] = ()) -> NodeStatus:
        """`entry` with each top flow's remote backend, where known; `now` is monotonic
        seconds, `period` the report period (the table is read at most once in it). `resumed`:
        the flows of the node's report as an earlier agent wrote it, whose backends stand (the
        connection may be gone from the table by now)."""
        for flow in resumed:
            if flow.remote.backend is not None and self.answers.get(flow_tuple(flow)) is None:
                self._remember(flow_tuple(flow), flow.remote.backend)
        unresolved = []
        for flow in entry.top_flows:
            key = flow_tuple(flow)
            if flow.remote.backend is not None:
                self._remember(key, flow.remote.backend)
            elif key in self.answers:
                self.answers.move_to_end(key)
            elif _may_have_backend(flow):
                unresolved.append(key)
        if unresolved and (self.read_at is None or now - self.read_at >= period):
            self.read_at = now
            self._look_up(unresolved)
        if not any(flow.remote.backend is None and self.answers.get(flow_tuple(flow)) is not None
                   for flow in entry.top_flows):
            return entry
        return entry.model_copy(update={"top_flows": [self._with_backend(flow) for flow in entry.top_flows]})

    def _look_up(self, keys: list[FlowTuple]) -> None:
        try:
            found = find_backends(self.read(), keys)
        except OSError as exc:
            if self.problem is None:
                log.warning("conntrack table unreadable (%s): flows to Service addresses get no backend "
                            "(needs root and CONFIG_NF_CONNTRACK_PROCFS on the node)", exc)
            self.problem = str(exc)
            found = {}
        self.reads += 1
        for key in keys:
            answer = found.get(key)
            if answer is not None:
                self.misses.pop(key, None)
                self._remember(key, answer.backend)
                continue
            missed = self.misses.pop(key, 0) + 1
            if missed >= self.lookups:
                self._remember(key, None)   # gone before it was seen, or never through this node's NAT
            else:
                self.misses[key] = missed
                while len(self.misses) > self.capacity:
                    self.misses.popitem(last=False)

    def _remember(self, key: FlowTuple, backend: Optional[Backend]) -> None:
        if self.answers.get(key) is None or backend is not None:
            self.answers[key] = backend
        self.answers.move_to_end(key)
        while len(self.answers) > self.capacity:
            self.answers.popitem(last=False)

    def _with_backend(self, flow: Flow) -> Flow:
        backend = self.answers.get(flow_tuple(flow)) if flow.remote.backend is None else None
        if backend is None:
            return flow
        return flow.model_copy(update={"remote": flow.remote.model_copy(update={"backend": backend})})


def _may_have_backend(flow: Flow) -> bool:
    """A local pod (named by the agent) or a loopback address is never a Service's."""
    if flow.remote.pod:
        return False
    try:
        return not ipaddress.ip_address(flow.remote.ip).is_loopback
    except ValueError:
        return False
