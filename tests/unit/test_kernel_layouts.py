"""Each kernel's tracepoint layout gives the program the right switches, and a filter the
kernel cannot honour is refused with the reason (format files in tests/data/tracepoints)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from retransmit_agent.kernelconfig import KernelConfig, require_fitting_layout
from retransmit_agent.kernelinfo import KernelFeatures, read_layout
from retransmit_agent.preflight import KernelProblem

pytestmark = pytest.mark.unit

DATA = Path(__file__).resolve().parents[1] / "data" / "tracepoints"

# kernel -> the switches its tracepoints give (state 5.0+, err 6.17+; family is never read)
EXPECTED = {
    "4.15": [], "4.19": [],
    "5.4": ["HAVE_SKB_STATE"], "5.10": ["HAVE_SKB_STATE"],
    "5.15": ["HAVE_SKB_STATE"], "6.1": ["HAVE_SKB_STATE"],
    "6.17": ["HAVE_SKB_STATE", "HAVE_SKB_ERR"],
}


def tracefs_of(kernel: str, root: Path) -> Path:
    for event in ("tcp_retransmit_skb", "tcp_retransmit_synack"):
        folder = root / "events" / "tcp" / event
        folder.mkdir(parents=True)
        shutil.copy(DATA / kernel / f"{event}.format", folder / "format")
    return root


@pytest.mark.parametrize("kernel", sorted(EXPECTED))
def test_each_kernels_layout_gives_its_switches(kernel, tmp_path):
    layout = read_layout(tracefs_of(kernel, tmp_path))
    assert layout.missing() == []
    assert layout.switches() == EXPECTED[kernel]
    assert layout.has("family") == (kernel in ("5.15", "6.1", "6.17"))


def test_the_data_covers_every_layout_the_program_knows():
    assert sorted(p.name for p in DATA.iterdir() if p.is_dir()) == sorted(EXPECTED)


@pytest.mark.parametrize("kernel", ["4.15", "4.19"])
def test_a_states_filter_is_refused_where_the_kernel_has_no_state(kernel, tmp_path):
    features = KernelFeatures(read_layout(tracefs_of(kernel, tmp_path)), jiffies64=False, ringbuf=False)
    require_fitting_layout(KernelConfig(), features)    # counting itself works there
    with pytest.raises(KernelProblem) as problem:
        require_fitting_layout(KernelConfig(states=frozenset({"ESTABLISHED"})), features)
    message = str(problem.value)
    assert "ESTABLISHED" in message and "`state` field" in message
    assert "remove the states filter" in message and "UNKNOWN" in message


def test_a_states_filter_is_kept_where_the_kernel_has_state(tmp_path):
    features = KernelFeatures(read_layout(tracefs_of("5.4", tmp_path)), jiffies64=False, ringbuf=False)
    require_fitting_layout(KernelConfig(states=frozenset({"ESTABLISHED"})), features)


def test_a_layout_without_the_address_fields_is_refused_naming_them(tmp_path):
    root = tracefs_of("6.1", tmp_path)
    fmt = root / "events" / "tcp" / "tcp_retransmit_synack" / "format"
    fmt.write_text("\n".join(line for line in fmt.read_text().splitlines() if "daddr_v6" not in line))
    features = KernelFeatures(read_layout(root), jiffies64=True, ringbuf=True)
    with pytest.raises(KernelProblem, match=r"tcp_retransmit_synack\.daddr_v6"):
        require_fitting_layout(KernelConfig(), features)


def test_features_describe_the_mode_in_one_line(tmp_path):
    features = KernelFeatures(read_layout(tracefs_of("5.4", tmp_path)), jiffies64=False, ringbuf=False)
    assert features.describe() == ("tracepoint fields: state yes, family no, err no; perf buffer; "
                                   "clock per event; causes unknown (not probed); no sockets' cgroups (not probed)")
    assert features.switches()[0] == "-DHAVE_SKB_STATE"
    assert not [flag for flag in features.switches() if "SOCK" in flag]
