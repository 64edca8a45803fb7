"""Each local pod's TCP segment counters (Tcp OutSegs, RetransSegs) from its own network
namespace: a pod's retransmit ratio over a trace, as segments.py gives the node's.

How the agent reaches a pod's namespace, as the DaemonSet runs it (hostNetwork, not hostPID,
no CAP_SYS_PTRACE in the capabilities mode):
- The host's processes: the host's /proc, mounted read-only (contract.ENV_HOST_PROC names
  where; "/proc" when unset). Least privilege: no hostPID, no setns, nothing written.
- A process's namespace: /proc/PID/ns/net needs ptrace access to PID (refused without
  CAP_SYS_PTRACE for another user's or a more privileged process), but /proc/PID/net/* are
  world-readable and show PID's network namespace. The inode number of /proc/PID/net/snmp
  is the namespace's own proc inode (the number ns/net would show), so one stat() names
  the namespace, and /proc/PID/net/snmp holds its counters (tests/kernel/test_ratio.py).
- Which namespace is a pod's: the one whose local addresses (/proc/PID/net/fib_trie and
  if_inet6, read as podwatch.node_addresses reads the node's) hold every one of the pod's
  IPs from the agent's pod watch. By address, not by /proc/PID/cgroup's pod UID: that
  depends on the runtime and cgroup driver, and the node simulator's pods share its cgroup
  and several simulated nodes share one host; an address names the pod on both. A
  namespace that two pods' addresses would both fit, or that holds a pod's addresses twice,
  names no pod (no counters rather than another's).
- Cost: one pid per pod is remembered and revalidated at each read (its net/snmp still has
  the namespace's inode: a stat and a read per pod); /proc is scanned only for pods without
  a live pid, at most once per read, one stat per process and one address read per unknown
  namespace. Every selected local pod is read, not only the report's top rows: a pod's
  start must be read before anyone knows whether it will retransmit, and a node runs at most
  kubelet's maxPods (110 by default).

When a pod's counting starts: a pod created after counting began has a namespace born after
it, whose counters began at 0, so all of them count; any other pod counts from the first
read that finds it (at counting start for the pods known then). A namespace replaced under
a pod (its sandbox re-created) adds its counts, from 0, to what the earlier one counted.
hostNetwork pods are never read: they share the node's namespace (the node's outSegs).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Iterable, Mapping, Optional

from retransmit_core.contract import ENV_HOST_PROC
from retransmit_core.podindex import PodFacts

from .podwatch import node_addresses
from .segments import TcpSegments, read_tcp_segments

log = logging.getLogger(__name__)

PodKey = tuple[str, str]   # (namespace, pod), as resume.PodKey
ZERO = TcpSegments(0, 0)


def host_proc() -> Path:
    """Where the host's /proc is, as the DaemonSet says (contract.ENV_HOST_PROC)."""
    return Path(os.environ.get(ENV_HOST_PROC) or "/proc")


# ---------------------------------------------------------------- pure

@dataclass(frozen=True)
class PodNamespace:
    """One pod's network namespace as the reader follows it."""

    netns: int                  # the namespace's inode number
    pid: int                    # a process in it, revalidated at each read
    start: TcpSegments          # the namespace's counters when counting began for it
    earlier: TcpSegments = ZERO  # what the pod's earlier namespaces counted

    def total(self, now: TcpSegments) -> TcpSegments:
        """The pod's segments since counting began, given its namespace's counters `now`."""
        return self.earlier.plus(now.since(self.start))


def found_namespace(previous: Optional[PodNamespace], counted: Optional[TcpSegments], netns: int, pid: int,
                    now: TcpSegments, born_after_start: bool) -> PodNamespace:
    """The pod's tracking once found in `netns` (through `pid`, counters `now`).

    previous: how it was followed until now (None: never found before); counted: its total
    so far. The same namespace keeps its start (only the pid changes). A new namespace of a
    pod already followed, or of a pod created after counting began (`born_after_start`), was
    born during the count: its counters started at 0. Any other starts at `now`.
    """
    if previous is not None and previous.netns == netns:
        return replace(previous, pid=pid)
    start = ZERO if previous is not None or born_after_start else now
    return PodNamespace(netns=netns, pid=pid, start=start, earlier=counted or ZERO)


def match_namespaces(pods: Mapping[PodKey, Iterable[str]], addresses: Mapping[int, frozenset[str]]) -> dict[PodKey, int]:
    """pod -> the namespace holding every one of its IPs. A pod that no namespace or several
    fit, and a namespace that fits several pods, match nothing."""
    fits: dict[PodKey, list[int]] = {}
    for key, ips in pods.items():
        wanted = frozenset(ips)
        if wanted:
            fits[key] = [netns for netns, held in addresses.items() if wanted <= held]
    claimed: dict[int, int] = {}
    for netns_list in fits.values():
        for netns in netns_list:
            claimed[netns] = claimed.get(netns, 0) + 1
    return {key: found[0] for key, found in fits.items() if len(found) == 1 and claimed[found[0]] == 1}


def created_after(created: Optional[str], since: datetime) -> bool:
    """Whether a pod's creationTimestamp (whole seconds, RFC 3339) is after `since` (aware).
    Unknown or unreadable: False, so the pod counts from its first read (never too much)."""
    if not created:
        return False
    try:
        return datetime.fromisoformat(created.replace("Z", "+00:00")) > since
    except ValueError:
        return False


# ---------------------------------------------------------------- I/O

def netns_of(proc: Path, pid: str) -> Optional[int]:
    """The network namespace (inode number) process `pid` is in; None when it is gone."""
    try:
        return os.stat(proc / pid / "net" / "snmp").st_ino
    except OSError:
        return None


class PodSegmentReader:
    """Follows the local pods' namespaces and reads their counters (see the module's
    docstring). `since`: when counting began (aware datetime). Not thread-safe."""

    def __init__(self, since: datetime, proc: Optional[Path] = None) -> None:
        self.proc = proc or host_proc()
        self.since = since
        self._host_netns = netns_of(self.proc, "self")    # the node's: no pod's
        self._followed: dict[PodKey, PodNamespace] = {}
        self._totals: dict[PodKey, TcpSegments] = {}
        self.scans = 0                                     # /proc scans so far

    def read(self, pods: Iterable[PodFacts]) -> dict[PodKey, TcpSegments]:
        """Every pod's segments since counting began, for `pods` (their own network's; others
        are skipped) and the pods read before (their last counts: a pod that is gone keeps
        what it sent)."""
        wanted = {(p.namespace, p.name): p for p in pods if not p.host_network and p.ips}
        missing = [key for key in wanted if not self._reread(key)]
        if missing:
            self._find({key: wanted[key] for key in missing})
        return dict(self._totals)

    def _reread(self, key: PodKey) -> bool:
        followed = self._followed.get(key)
        if followed is None or netns_of(self.proc, str(followed.pid)) != followed.netns:
            return False
        now = read_tcp_segments(str(self.proc / str(followed.pid) / "net" / "snmp"))
        if now is None:
            return False
        self._totals[key] = followed.total(now)
        return True

    def _find(self, pods: Mapping[PodKey, PodFacts]) -> None:
        self.scans += 1
        holders = self._namespaces()
        addresses = {netns: frozenset(node_addresses(self.proc / pid)) for netns, pid in holders.items()}
        for key, netns in match_namespaces({key: pod.ips for key, pod in pods.items()}, addresses).items():
            pid = holders[netns]
            now = read_tcp_segments(str(self.proc / pid / "net" / "snmp"))
            if now is None:
                continue
            followed = found_namespace(self._followed.get(key), self._totals.get(key), netns, int(pid), now,
                                       created_after(pods[key].created, self.since))
            self._followed[key] = followed
            self._totals[key] = followed.total(now)

    def _namespaces(self) -> dict[int, str]:
        """Network namespace -> one process in it, for every namespace but the node's."""
        found: dict[int, str] = {}
        try:
            entries = [entry.name for entry in os.scandir(self.proc) if entry.name.isdigit()]
        except OSError as exc:
            log.warning("cannot list %s (%s): no per-pod segment counters", self.proc, exc)
            return found
        for pid in entries:
            netns = netns_of(self.proc, pid)
            if netns is not None and netns != self._host_netns:
                found.setdefault(netns, pid)
        return found
