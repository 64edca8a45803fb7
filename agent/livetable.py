"""The live table of `retransmit-agent local`: a NodeStatus rendered with rich (pure)."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from retransmit_core.api import NodeStatus, format_endpoint
from retransmit_core.ratio import format_ratio



def format_causes(by_cause: dict[str, int]) -> str:
    """'fast 12 probe 3': causes with counts, most first (unknown last)."""
    order = sorted(by_cause.items(), key=lambda item: (item[0] == "unknown", -item[1], item[0]))
    return " ".join(f"{cause} {n}" for cause, n in order if n) or "-"


def node_segments(report: NodeStatus) -> str:
    """'120/9000 (1.33%)': the node's TCP segments retransmitted and sent since counting began."""
    if report.out_segs is None or report.retrans_segs is None:
        return "unknown"
    return f"{report.retrans_segs}/{report.out_segs} ({format_ratio(report.retrans_ratio)})"


def render_report(report: NodeStatus, elapsed: float, duration: float | None) -> Group:
    """Totals line, per-state line and the top-flows table."""
    limit = f" of {duration:g}s" if duration else ""
    header = Text.assemble(
        ("retransmits ", "bold"), str(report.retransmits),
        ("   SYN-ACK retransmits ", "bold"), str(report.synack_retransmits),
        ("   flows ", "bold"), str(report.flows),
        ("   lost samples ", "bold"), str(report.lost_events),
        ("   missed hits ", "bold"), "unknown" if report.missed_events is None else str(report.missed_events),
        ("   failed attempts ", "bold"), "unknown" if report.failed_attempts is None else str(report.failed_attempts),
        ("   node retransmitted/sent ", "bold"), node_segments(report),
        ("   elapsed ", "dim"), f"{elapsed:.0f}s{limit}",
    )
    states = Text("by state: " + ("  ".join(f"{k} {v}" for k, v in report.by_state.items()) or "-")
                  + "   by cause: " + format_causes(report.by_cause), style="dim")
    table = Table(title=f"top flows on {report.node}", title_justify="left", expand=False)
    table.add_column("fam")
    table.add_column("local (retransmitting)", no_wrap=True)
    table.add_column("remote", no_wrap=True)
    table.add_column("retransmits", justify="right")
    table.add_column("ratio", justify="right")
    table.add_column("SYN-ACK", justify="right")
    table.add_column("last state", no_wrap=True)
    table.add_column("causes", no_wrap=True)
    table.add_column("srtt", justify="right")
    table.add_column("cwnd", justify="right")
    table.add_column("timeouts", justify="right")
    table.add_column("last seen", no_wrap=True)
    for flow in report.top_flows:
        cells = (
            "v4" if str(flow.family) == "IPv4" else "v6",
            format_endpoint(flow.local.ip, flow.local.port),
            format_endpoint(flow.remote.ip, flow.remote.port),
            str(flow.retransmits),
            format_ratio(flow.retrans_ratio),
            str(flow.synack_retransmits),
            str(flow.last_state or "-"),
            format_causes(flow.by_cause),
            f"{flow.socket.srtt_microseconds / 1000:.1f}ms" if flow.socket else "-",
            str(flow.socket.congestion_window) if flow.socket else "-",
            str(flow.socket.consecutive_timeouts) if flow.socket else "-",
            flow.last_seen.strftime("%H:%M:%S") if flow.last_seen else "-",
        )
        table.add_row(*(Text(cell) for cell in cells))  # Text: "[fd00::1]:443" is not markup
    return Group(header, states, table)
