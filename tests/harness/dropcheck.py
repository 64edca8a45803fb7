"""The reference for drops by reason: an nftables rule that drops and counts (NETFILTER_DROP).

Shared by tests/kernel/test_drops.py on the host's kernel and tests/harness/vm_scenarios.py's
`drops` section inside Debian's kernels, so both compare the same way:

    drop_client_data(ns, client, server, port, percent=10)   # the rule, with its counter
    flows = run_driver(ns, "tests.harness.traffic", "bulk", ...)
    netfilter_drop_mismatches(snapshot.drops, nft_dropped(ns), flows, server, port, family)
"""

from __future__ import annotations

import json
import re
import subprocess

from retransmit_agent.drops import DropSnapshot

from .netns import LossNamespace

NETFILTER_DROP = "NETFILTER_DROP"


def drop_client_data(ns: LossNamespace, client: str, server: str, port: int, percent: int) -> None:
    """`percent`% of the client's data segments to server:port dropped on input, counted by the rule."""
    match = "ip6" if ":" in server else "ip"
    ns.nft(f"flush chain inet {ns.table} input\n"
           f"add rule inet {ns.table} input {match} saddr {client} tcp dport {port} tcp flags & syn == 0 "
           f"numgen random mod 100 < {percent} counter drop\n")


def nft_dropped(ns: LossNamespace) -> int:
    """Packets the namespace's counted drop rule dropped (its `counter packets N`)."""
    text = ns.exec("nft", "list", "chain", "inet", ns.table, "input")
    counts = [int(n) for n in re.findall(r"counter packets (\d+)", text)]
    assert counts, text
    return sum(counts)


def run_driver(ns: LossNamespace, module: str, *args: str) -> list[dict]:
    """Run a traffic driver in the namespace to its end; its last line lists the connections."""
    proc = ns.python(module, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def within_misses(ours: int, reference: int, missed: int) -> bool:
    """Our count equals the reference's, short by at most the kfree_skb hits the kernel did not
    run the program for (recursion protection, counted since 6.7)."""
    return ours <= reference <= ours + missed


def netfilter_drop_mismatches(drops: DropSnapshot, dropped: int, connections: list[dict], server: str,
                              port: int, family: str) -> list[str]:
    """What breaks drops-by-reason against the rule's counter `dropped` (the rule dropping the
    clients' segments to server:port, program tracing only the server's address): the
    NETFILTER_DROP total equals the counter, and so does its sum over the flows, all inbound
    to the server, keyed from the server's end (the sender's retransmitting flow reversed), one
    of the driver's `connections`. Empty: they agree."""
    problems = []
    if dropped <= 0:
        problems.append("the rule dropped nothing: the comparison proves nothing")
    total = drops.by_reason.get(NETFILTER_DROP, 0)
    if not within_misses(total, dropped, drops.missed):
        problems.append(f"{NETFILTER_DROP} {total} != the rule's {dropped} (missed {drops.missed})")
    clients = {(c["client"][0], c["client"][1]) for c in connections}
    per_flow = {(f.remote_ip, f.remote_port): f for f in drops.flows if f.by_reason.get(NETFILTER_DROP)}
    if not per_flow or not set(per_flow) <= clients:
        problems.append(f"flows with {NETFILTER_DROP} {sorted(per_flow)} are not some of the clients {sorted(clients)}")
    # Its NETFILTER_DROP drops all inbound. Beside them, the same node may drop the server's own
    # segments at the client's socket (e.g. TCP_OLD_SEQUENCE after a spurious retransmit; both
    # ends share this kernel): outbound drops of the server's flow, for other reasons only.
    wrong = [f for f in per_flow.values()
             if not (f.local_ip == server and f.local_port == port and f.family == family
                     and f.outbound <= sum(n for reason, n in f.by_reason.items() if reason != NETFILTER_DROP))]
    if wrong:
        problems.append(f"flows not inbound to {server}:{port} ({family}): {wrong}")
    in_flows = sum(f.by_reason[NETFILTER_DROP] for f in per_flow.values())
    if not within_misses(in_flows, dropped, drops.missed):
        problems.append(f"{NETFILTER_DROP} summed over flows {in_flows} != the rule's {dropped}")
    return problems
