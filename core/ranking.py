"""Busiest first: the one order of flows, and of pods, for the agent's table and report and the trace's summary.

Most retransmits (tcp_retransmit_skb + SYN-ACK) first; ties: the latest activity first (a flow
never seen last sorts after those that were), then by node, family, local address and port,
remote address and port (addresses and families compare as text: cheap, and
enough for a stable order). Distinct flows never tie, so a list does not flap between writes.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Optional

from .api import Flow


def busiest_first_key(total: int, last_seen: Optional[datetime], family: str, local_ip: str, local_port: int,
                      remote_ip: str, remote_port: int, node: str = "") -> tuple:
    """Sort key for one flow; the agent's kernel-map flows pass their fields (no API objects
    for 32k flows), API flows go through `flow_key`."""
    recency = -last_seen.timestamp() if last_seen is not None else math.inf
    return (-total, recency, node, family, local_ip, local_port, remote_ip, remote_port)


def flow_key(flow: Flow, node: Optional[str] = None) -> tuple:
    """busiest_first_key of an API flow; `node` when the flow does not carry its own yet."""
    # IPFamily is a str enum: it orders as its text, like the agent's "IPv4" / "IPv6".
    return busiest_first_key(flow.retransmits + flow.synack_retransmits, flow.last_seen, flow.family,
                             flow.local.ip, flow.local.port, flow.remote.ip, flow.remote.port,
                             node or flow.node or "")


def pod_key(retransmits: int, namespace: str, pod: str) -> tuple:
    """Sort key for one pod's count: most retransmits first, ties by namespace, then name."""
    return (-retransmits, namespace, pod)
