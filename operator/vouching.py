"""Which nodes' reports a trace may count: those an agent of the trace can have written.

The report guard (an admission policy) lets each node's agent write only its own node's
report and Lease, but any node's token may create its node's report for any trace. Without
this check a node that the trace never selected (or a node credential used by hand) could
add rows and counts to any trace. A report counts when:
- an agent pod of the trace runs, or ran while this operator watched, on its node; or
- the trace's placement selects its node (nodeSelector and tolerations: an agent belongs
  there, it may be starting); or
- the operator marked it departed (it counted before the node left the trace); or
- the operator cannot tell: the node is not (yet) known from the Node watch.
The others are left out of the trace's summary and rows, and the trace gets a Warning Event
naming them (reconciler.py); their reports stay, for whoever looks.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional

from retransmit_core.naming import TRACE_LABEL

from .placement import NodeFacts, Placement, places_agent
from .reportindex import StoredReport

IGNORED_REASON = "ReportIgnored"


def unvouched(reports: Iterable[StoredReport], agent_nodes: frozenset[str], nodes: Mapping[str, NodeFacts],
              where: Optional[Placement]) -> frozenset[str]:
    """The nodes whose report no agent of the trace can have written (see the module)."""
    out = set()
    for report in reports:
        node = report.entry.node
        if node in agent_nodes or report.status.departed:
            continue
        facts = nodes.get(node)
        if facts is None or where is None:
            continue
        if places_agent(facts, where):
            continue
        out.add(node)
    return frozenset(out)


def ignored_message(nodes: Iterable[str], namespace: str, trace: str) -> str:
    names = sorted(nodes)
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return (f"reports from node(s) {shown} are left out of this trace: no agent pod of the trace runs there and "
            f"its nodeSelector and tolerations do not select them, so its agents did not write them. "
            f"Inspect them with: kubectl -n {namespace} get rtreport -l {TRACE_LABEL}={trace}")
