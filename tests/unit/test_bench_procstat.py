"""bench/procstat.py: the /proc parsers the bench's CPU, memory and kernel-cost figures rest on."""

from __future__ import annotations

import math
import os

import pytest

from bench import procstat
from bench.procstat import ProgStats

pytestmark = pytest.mark.unit

# A real /proc/<pid>/stat line, with a command name holding a space and a parenthesis.
STAT = ("4242 (python3 (x) y) S 1 4242 4242 0 -1 4194560 31955 0 0 0 "
        "1234 567 0 0 20 0 3 0 9510 300000000 30000 18446744073709551615 1 1 0 0 0 0 0 16781312 16386 0 0 0 17 1 0 0 0 0 0")


def test_cpu_ticks_are_utime_plus_stime_even_with_parentheses_in_the_command_name():
    assert procstat.parse_cpu_ticks(STAT) == 1234 + 567


def test_cpu_ticks_of_this_process_count_its_own_work():
    before = procstat.cpu_ticks(os.getpid())
    for _ in range(10_000):  # far more than 2 ticks of work, bounded so it cannot spin
        sum(range(10_000))
        if procstat.cpu_ticks(os.getpid()) - before >= 2:
            break
    assert procstat.cpu_ticks(os.getpid()) - before >= 2


def test_status_kb_reads_the_named_line_only():
    status = "Name:\tpython3\nVmPeak:\t  900 kB\nVmHWM:\t  153000 kB\nVmRSS:\t  120000 kB\n"
    assert procstat.parse_status_kb(status, "VmHWM") == 153000
    assert procstat.parse_status_kb(status, "VmRSS") == 120000
    with pytest.raises(KeyError):
        procstat.parse_status_kb(status, "VmSwap")


def test_peak_memory_of_this_process_is_at_least_its_current_memory():
    status = open(f"/proc/{os.getpid()}/status").read()  # one reading: memory moves between two
    assert procstat.parse_status_kb(status, "VmHWM") >= procstat.parse_status_kb(status, "VmRSS") > 0


FDINFO = "pos:\t0\nflags:\t02000002\nmnt_id:\t17\nprog_type:\t5\nprog_jited:\t1\nprog_tag:\td4009fe8b3dbd174\n" \
         "memlock:\t4096\nprog_id:\t622\nrun_time_ns:\t1500000\nrun_cnt:\t10000\nrecursion_misses:\t0\n"


def test_fdinfo_of_a_bpf_program_gives_its_run_time_accounting():
    stats = ProgStats.from_fdinfo(procstat.parse_fdinfo(FDINFO))
    assert stats == ProgStats(prog_id=622, run_time_ns=1_500_000, run_cnt=10_000)


def test_ns_per_run_is_the_ratio_of_the_deltas_over_all_programs():
    before = [ProgStats(1, 1_000, 10), ProgStats(2, 500, 5)]
    after = [ProgStats(1, 21_000, 110), ProgStats(2, 500, 5), ProgStats(3, 3_000, 10)]  # 3: attached meanwhile
    ns, runs = procstat.ns_per_run(before, after)
    assert runs == 100 + 0 + 10
    assert ns == pytest.approx((20_000 + 3_000) / 110)


def test_ns_per_run_without_runs_is_not_a_number():
    ns, runs = procstat.ns_per_run([ProgStats(1, 5, 1)], [ProgStats(1, 5, 1)])
    assert runs == 0 and math.isnan(ns)


@pytest.mark.parametrize("q, expected", [(0, 1.0), (50, 2.5), (100, 4.0), (99, 3.97)])
def test_percentile_interpolates_between_ranks(q, expected):
    assert procstat.percentile([4.0, 1.0, 3.0, 2.0], q) == pytest.approx(expected)


def test_percentile_of_nothing_is_not_a_number():
    assert math.isnan(procstat.percentile([], 99))


def test_cpu_percent_of_one_core():
    assert procstat.cpu_percent(procstat.CLOCK_TICKS * 3, 30.0) == pytest.approx(10.0)
