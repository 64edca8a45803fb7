"""Service backends from the node's conntrack table (agent/conntrack.py): the parser of
/proc/net/nf_conntrack lines, the look-up of a report's flows, and what the agent remembers
and how often it reads."""

from __future__ import annotations

import pytest

from retransmit_agent.conntrack import NO_BACKEND, Answer, ServiceBackends, find_backends, parse_line, read_table
from retransmit_core.api import Backend, Endpoint, Flow, NodeStatus

pytestmark = pytest.mark.unit

# As the kernel prints them (nf_conntrack_standalone.c): IPv6 as %pI6, eight full groups.
V4_TRANSLATED = ("ipv4     2 tcp      6 431999 ESTABLISHED src=198.18.1.2 dst=198.19.0.110 sport=43210 dport=80 "
                 "src=198.18.2.3 dst=198.18.1.2 sport=5201 dport=43210 [ASSURED] mark=0 zone=0 use=2\n")
V6_TRANSLATED = ("ipv6     10 tcp      6 119 SYN_SENT src=fd00:0000:0000:0001:0000:0000:0000:0002 "
                 "dst=fd00:0000:ffff:0000:0000:0000:0000:0110 sport=40000 dport=80 packets=3 bytes=180 [UNREPLIED] "
                 "src=fd00:0000:0000:0002:0000:0000:0000:0003 dst=fd00:0000:0000:0001:0000:0000:0000:0002 "
                 "sport=5201 dport=40000 packets=0 bytes=0 mark=0 zone=0 use=2\n")
V4_PLAIN = ("ipv4     2 tcp      6 86399 ESTABLISHED src=198.18.1.2 dst=198.18.2.3 sport=43300 dport=5201 "
            "src=198.18.2.3 dst=198.18.1.2 sport=5201 dport=43300 [ASSURED] mark=0 zone=0 use=2\n")
# A NodePort on node-b's address, masqueraded to node-b's address on its way to the pod.
V4_NODE_PORT = ("ipv4     2 tcp      6 431999 ESTABLISHED src=198.18.1.2 dst=198.18.0.20 sport=43400 dport=30080 "
                "src=198.18.2.3 dst=198.18.0.20 sport=5201 dport=61000 [ASSURED] mark=0 zone=0 use=2\n")
UDP = ("ipv4     2 udp      17 29 src=198.18.1.2 dst=198.19.0.10 sport=5353 dport=53 "
       "src=198.18.2.9 dst=198.18.1.2 sport=53 dport=5353 mark=0 zone=0 use=2\n")
TABLE = [V4_TRANSLATED, V6_TRANSLATED, V4_PLAIN, V4_NODE_PORT, UDP]

CLIENT_V4 = ("IPv4", "198.18.1.2", 43210, "198.19.0.110", 80)
CLIENT_V6 = ("IPv6", "fd00:0:0:1::2", 40000, "fd00:0:ffff::110", 80)
POD_TO_POD = ("IPv4", "198.18.1.2", 43300, "198.18.2.3", 5201)
SERVER_V4 = ("IPv4", "198.18.2.3", 5201, "198.18.1.2", 43210)   # the backend's own flow back to the client
NODE_PORT = ("IPv4", "198.18.1.2", 43400, "198.18.0.20", 30080)


def test_a_translated_ipv4_line_parses_to_both_tuples_and_its_target():
    entry = parse_line(V4_TRANSLATED)
    assert entry.family == "IPv4"
    assert (entry.original.src, entry.original.sport, entry.original.dst, entry.original.dport) == \
        ("198.18.1.2", 43210, "198.19.0.110", 80)
    assert entry.translated_to == ("198.18.2.3", 5201)


def test_an_ipv6_line_with_counters_and_unreplied_parses_with_canonical_addresses():
    entry = parse_line(V6_TRANSLATED)
    assert (entry.family, entry.original.src, entry.original.dst) == ("IPv6", "fd00:0:0:1::2", "fd00:0:ffff::110")
    assert entry.translated_to == ("fd00:0:0:2::3", 5201)


def test_an_entry_whose_reply_comes_from_where_it_went_is_not_translated():
    assert parse_line(V4_PLAIN).translated_to is None


@pytest.mark.parametrize("line", [
    "", "\n", "garbage", UDP,
    V4_TRANSLATED.replace("sport=43210", "sport=x"),          # not a number
    V4_TRANSLATED.replace("dst=198.19.0.110 ", ""),           # a key missing
    V4_TRANSLATED.replace("src=198.18.1.2", "src=198.18.1"),  # not an address
    V4_TRANSLATED.split(" src=198.18.2.3")[0],                # cut before the reply
    V4_TRANSLATED.replace("ipv4     2", "arp     2"),
])
def test_malformed_or_non_tcp_lines_are_skipped(line):
    assert parse_line(line) is None
    assert find_backends([line], [CLIENT_V4]) == {}


def test_the_look_up_names_backends_in_both_families_and_says_which_flows_have_none():
    found = find_backends(TABLE, [CLIENT_V4, CLIENT_V6, POD_TO_POD, SERVER_V4, NODE_PORT,
                                  ("IPv4", "198.18.1.2", 50000, "198.19.0.110", 80)])
    assert found[CLIENT_V4] == Answer(Backend(ip="198.18.2.3", port=5201))
    assert found[CLIENT_V6] == Answer(Backend(ip="fd00:0:0:2::3", port=5201))
    assert found[NODE_PORT] == Answer(Backend(ip="198.18.2.3", port=5201))
    assert found[POD_TO_POD] is NO_BACKEND     # the table holds it: no translation
    assert found[SERVER_V4] is NO_BACKEND      # the accepting side is the backend itself
    assert len(found) == 5                     # a connection the table does not hold: no answer


def test_the_same_source_towards_another_destination_is_not_a_match():
    assert find_backends([V4_TRANSLATED], [("IPv4", "198.18.1.2", 43210, "198.19.0.111", 80)]) == {}


def test_read_table_streams_the_first_readable_path_and_says_when_none_is(tmp_path):
    table = tmp_path / "nf_conntrack"
    table.write_text("".join(TABLE))
    assert list(read_table([tmp_path / "missing", table])) == TABLE
    with pytest.raises(FileNotFoundError):
        list(read_table([tmp_path / "missing"]))


# ---------------------------------------------------------------- what the agent remembers

def flow(key, **remote) -> Flow:
    family, lip, lport, rip, rport = key
    return Flow(local=Endpoint(ip=lip, port=lport), remote=Endpoint(ip=rip, port=rport, **remote),
                family=family, retransmits=3)


def report(*flows) -> NodeStatus:
    return NodeStatus(node="node-a", top_flows=list(flows))


class Table:
    """The node's table as the agent reads it, counted."""

    def __init__(self, lines):
        self.lines, self.reads = list(lines), 0

    def __call__(self):
        self.reads += 1
        return iter(self.lines)


def backends_of(entry: NodeStatus) -> dict:
    return {(f.local.ip, f.local.port): f.remote.backend for f in entry.top_flows}


def test_a_found_backend_stays_after_the_connection_left_the_table():
    table = Table(TABLE)
    backends = ServiceBackends(read=table)
    entry = report(flow(CLIENT_V4), flow(CLIENT_V6))
    first = backends.named(entry, now=0.0, period=10.0)
    assert backends_of(first) == {("198.18.1.2", 43210): Backend(ip="198.18.2.3", port=5201),
                                  ("fd00:0:0:1::2", 40000): Backend(ip="fd00:0:0:2::3", port=5201)}
    table.lines = []   # both connections closed
    assert backends.named(entry, now=100.0, period=10.0) == first
    assert table.reads == 1   # every flow has its answer: the table is not read again


def test_the_table_is_read_at_most_once_a_period_and_a_missing_flow_is_given_up_on():
    table = Table([])
    backends = ServiceBackends(read=table, lookups=3)
    entry = report(flow(CLIENT_V4))
    for now in (0.0, 1.0, 2.0):            # one report period: one read
        backends.named(entry, now=now, period=10.0)
    assert table.reads == 1
    for now in (10.0, 20.0, 30.0, 40.0):   # two more misses, then the flow has no backend
        backends.named(entry, now=now, period=10.0)
    assert table.reads == 3
    table.lines = TABLE                    # it is not looked up again
    assert backends_of(backends.named(entry, now=50.0, period=10.0)) == {("198.18.1.2", 43210): None}
    assert table.reads == 3


def test_flows_that_cannot_be_a_services_are_never_looked_up():
    table = Table(TABLE)
    backends = ServiceBackends(read=table)
    local_pod = flow(POD_TO_POD, pod="server", namespace="shop")
    loopback = flow(("IPv4", "127.0.0.1", 40000, "127.0.0.1", 8080))
    entry = report(local_pod, loopback)
    assert backends.named(entry, now=0.0, period=10.0) is entry and table.reads == 0


def test_a_resumed_reports_backend_stands_when_the_table_no_longer_holds_it():
    table = Table([])
    backends = ServiceBackends(read=table)
    resumed = flow(CLIENT_V4, backend=Backend(ip="198.18.2.3", port=5201))
    # The kernel still counts the flow, its fresh copy carries no backend.
    named = backends.named(report(flow(CLIENT_V4)), now=0.0, period=10.0, resumed=[resumed])
    assert backends_of(named) == {("198.18.1.2", 43210): Backend(ip="198.18.2.3", port=5201)}
    assert table.reads == 0


def test_an_unreadable_table_gives_no_backends_and_is_said_once(caplog):
    def unreadable():
        raise PermissionError(13, "Permission denied", "/proc/net/nf_conntrack")
    backends = ServiceBackends(read=unreadable, lookups=2)
    entry = report(flow(CLIENT_V4))
    for now in (0.0, 10.0, 20.0):
        assert backends.named(entry, now=now, period=10.0) == entry
    assert backends.reads == 2 and "Permission denied" in backends.problem
    assert sum("conntrack table unreadable" in r.getMessage() for r in caplog.records) == 1


def test_memory_is_bounded_and_the_reported_flows_are_the_last_forgotten():
    lines = [V4_TRANSLATED.replace("sport=43210", f"sport={40000 + i}").replace("dport=43210", f"dport={40000 + i}")
             for i in range(50)]
    backends = ServiceBackends(read=Table(lines), capacity=8)
    keys = [("IPv4", "198.18.1.2", 40000 + i, "198.19.0.110", 80) for i in range(50)]
    backends.named(report(*(flow(k) for k in keys)), now=0.0, period=10.0)
    assert len(backends.answers) == 8 and len(backends.misses) <= 8
    kept = report(*(flow(k) for k in keys[-8:]))
    assert all(backends_of(backends.named(kept, now=1.0, period=10.0)).values())
