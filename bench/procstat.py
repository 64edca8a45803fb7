"""Reading what a process costs from /proc: CPU ticks, peak memory, its BPF programs' run time.

Parsers are pure (text in, numbers out) so unit tests pin them down; the readers around
them do the I/O. All figures come from the kernel's own accounting:
- /proc/<pid>/stat utime + stime (clock ticks): CPU time of every thread of the process;
- /proc/<pid>/status VmHWM / VmRSS (kB): peak and current resident memory;
  writing "5" to /proc/<pid>/clear_refs resets VmHWM to the current RSS;
- /proc/<pid>/fdinfo/<fd> of a bpf-prog fd: run_time_ns and run_cnt, which the kernel
  keeps while sysctl kernel.bpf_stats_enabled=1.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")


def parse_cpu_ticks(stat: str) -> int:
    """utime + stime (clock ticks) from the text of /proc/<pid>/stat.

    The command name (field 2) is in parentheses and may hold spaces or ')' itself, so
    fields are counted from the last ')'. utime and stime are fields 14 and 15.
    """
    rest = stat[stat.rindex(")") + 2:].split()
    # rest[0] is field 3 (state): field n is rest[n - 3].
    return int(rest[14 - 3]) + int(rest[15 - 3])


def parse_status_kb(status: str, key: str) -> int:
    """A "Key:   123 kB" line of /proc/<pid>/status, in kB."""
    for line in status.splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0])
    raise KeyError(f"{key} not in /proc/<pid>/status")


def parse_fdinfo(text: str) -> dict[str, str]:
    """The "key:\\tvalue" lines of a /proc/<pid>/fdinfo/<fd> file."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


@dataclass(frozen=True)
class ProgStats:
    """Kernel run-time accounting of one BPF program (cumulative while bpf_stats is on)."""

    prog_id: int
    run_time_ns: int
    run_cnt: int

    @classmethod
    def from_fdinfo(cls, fields: dict[str, str]) -> "ProgStats":
        return cls(int(fields["prog_id"]), int(fields.get("run_time_ns", 0)), int(fields.get("run_cnt", 0)))


def ns_per_run(before: Sequence[ProgStats], after: Sequence[ProgStats]) -> tuple[float, int]:
    """Mean kernel ns per run between two readings of the same programs, and the runs.

    Programs are matched by prog_id; one present only `after` counts from zero.
    Returns (nan, 0) when nothing ran.
    """
    start = {p.prog_id: p for p in before}
    time_ns = runs = 0
    for p in after:
        b = start.get(p.prog_id)
        time_ns += p.run_time_ns - (b.run_time_ns if b else 0)
        runs += p.run_cnt - (b.run_cnt if b else 0)
    return (time_ns / runs if runs else math.nan), runs


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def cpu_percent(ticks: int, seconds: float) -> float:
    """Percent of one core that `ticks` of CPU time over `seconds` of wall time amount to."""
    return 100.0 * ticks / CLOCK_TICKS / seconds if seconds > 0 else math.nan


# ---------------------------------------------------------------- readers (I/O)

def cpu_ticks(pid: int) -> int:
    return parse_cpu_ticks(Path(f"/proc/{pid}/stat").read_text())


def memory_kb(pid: int, key: str = "VmHWM") -> int:
    return parse_status_kb(Path(f"/proc/{pid}/status").read_text(), key)


def reset_peak_memory(pid: int) -> None:
    """VmHWM := current RSS (Linux 4.0+), so a later VmHWM covers only what follows."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def bpf_prog_fds(pid: int) -> list[int]:
    """File descriptors of `pid` that hold a BPF program."""
    fds = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == "anon_inode:bpf-prog":
                fds.append(int(name))
        except OSError:
            continue
    return sorted(fds)


def prog_stats(pid: int, fds: Iterable[int] | None = None) -> list[ProgStats]:
    """Run-time accounting of the tracepoint programs `pid` holds (all of them by default).

    Distinct programs only: several fds of one program count once.
    """
    seen: dict[int, ProgStats] = {}
    for fd in (bpf_prog_fds(pid) if fds is None else fds):
        try:
            fields = parse_fdinfo(Path(f"/proc/{pid}/fdinfo/{fd}").read_text())
        except OSError:
            continue
        if fields.get("prog_type") == "5":  # BPF_PROG_TYPE_TRACEPOINT
            stats = ProgStats.from_fdinfo(fields)
            seen[stats.prog_id] = stats
    return list(seen.values())


class BpfStats:
    """`with BpfStats():` turns on kernel.bpf_stats_enabled and restores the old value after."""

    def __enter__(self) -> "BpfStats":
        self._old = BPF_STATS.read_text().strip()
        BPF_STATS.write_text("1")
        return self

    def __exit__(self, *exc: object) -> None:
        BPF_STATS.write_text(self._old)
