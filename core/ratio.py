"""The retransmit ratio: segments retransmitted per segment sent, as the kernel counted both.

One definition for a flow (its socket's tcp_sock data_segs_out and total_retrans), a node
and a pod (the Tcp OutSegs and RetransSegs of their network namespace). In both, the
segments sent include the retransmissions, so the ratio is the share of segments on the wire
that were retransmissions: with a per-segment loss probability p (retransmissions lost as
often as the rest), R = p * (N + R) for N new segments and R retransmissions, so the ratio
R / (N + R) estimates p itself.
"""

from __future__ import annotations

from typing import Optional

# Digits kept: a millionth is far below any loss worth a look, and fewer digits keep reports
# short and unchanged between reads of unchanged counters.
RATIO_DIGITS = 6


def retransmit_ratio(retransmitted: Optional[int], sent: Optional[int]) -> Optional[float]:
    """retransmitted / sent, rounded to RATIO_DIGITS; None when either is unknown or nothing was sent."""
    if retransmitted is None or sent is None or sent <= 0:
        return None
    return round(retransmitted / sent, RATIO_DIGITS)


def format_ratio(ratio: Optional[float]) -> str:
    """'2.41%' for tables; '-' when unknown. Two decimals of a percent down to 0.01%, then one
    significant digit, so a small ratio does not print as 0.00%."""
    if ratio is None:
        return "-"
    percent = ratio * 100
    if percent == 0 or percent >= 0.01:
        return f"{percent:.2f}%"
    return f"{percent:.1g}%"
