"""What one look-up of Service backends in the node's conntrack table costs the agent
(agent/conntrack.py): the table read and parsed once for a report's unresolved flows.

    python -m bench.conntrack_bench [--entries 10000 100000] [--flows 50] [--repeat 5]

A synthetic table (written to a temporary file, so the read goes through the same code as
/proc/net/nf_conntrack; the kernel's own cost of printing the real file is not in it): 80%
IPv4, 20% IPv6 entries, a quarter translated to a backend, a tenth with accounting counters
and [UNREPLIED], as the kernel prints them. `--flows` flows are looked up, half of them in
the table. Prints, per size, the best of `--repeat` runs: the agent's look-up
(find_backends over read_table: a cheap slice per line, a full parse only of lines whose
source matches), and, for comparison, parse_line over every line.
"""

from __future__ import annotations

import argparse
import ipaddress
import random
import tempfile
import time
from pathlib import Path

from retransmit_agent.conntrack import find_backends, parse_line, read_table

V4_PODS = ipaddress.ip_network("198.18.0.0/16")
V6_PODS = ipaddress.ip_network("fd00:0:1::/64")
V4_SERVICES = ipaddress.ip_network("198.19.0.0/16")
V6_SERVICES = ipaddress.ip_network("fd00:0:ffff::/112")


def _address(network, rng: random.Random) -> ipaddress._BaseAddress:
    return network[rng.randrange(2, min(network.num_addresses - 1, 1 << 20))]


def synthetic_line(i: int, rng: random.Random) -> tuple[str, tuple]:
    """One table line and the (family, local ip, local port, remote ip, remote port) of the
    flow that opened it."""
    v6 = rng.random() < 0.2
    pods, services = (V6_PODS, V6_SERVICES) if v6 else (V4_PODS, V4_SERVICES)
    client, sport = _address(pods, rng), 1024 + i % 60000
    translated = rng.random() < 0.25
    dst, dport = (_address(services, rng), 80) if translated else (_address(pods, rng), 5201)
    backend, bport = (_address(pods, rng), 8080) if translated else (dst, dport)
    text = (lambda a: a.exploded) if v6 else str
    counters = rng.random() < 0.1
    acct = " packets=12 bytes=1840" if counters else ""
    line = (f"{'ipv6     10' if v6 else 'ipv4     2'} tcp      6 431999 ESTABLISHED "
            f"src={text(client)} dst={text(dst)} sport={sport} dport={dport}{acct} "
            f"{'[UNREPLIED] ' if counters else ''}"
            f"src={text(backend)} dst={text(client)} sport={bport} dport={sport}{acct} [ASSURED] mark=0 zone=0 use=2\n")
    return line, ("IPv6" if v6 else "IPv4", client.compressed, sport, dst.compressed, dport)


def measure(entries: int, flows: int, repeat: int, seed: int = 1) -> dict:
    rng = random.Random(seed)
    lines, keys = zip(*(synthetic_line(i, rng) for i in range(entries)))
    wanted = list(rng.sample(keys, min(flows // 2, len(keys))))
    wanted += [("IPv4", "198.18.255.254", 1000 + i, "198.19.255.254", 80) for i in range(flows - len(wanted))]
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "nf_conntrack"
        table.write_text("".join(lines))
        look_up, full = [], []
        for _ in range(repeat):
            start = time.perf_counter()
            found = find_backends(read_table([table]), wanted)
            look_up.append(time.perf_counter() - start)
            start = time.perf_counter()
            parsed = sum(1 for line in read_table([table]) if parse_line(line) is not None)
            full.append(time.perf_counter() - start)
        size = table.stat().st_size
    assert len(found) == flows // 2 and parsed == entries, (len(found), parsed)
    return {"entries": entries, "bytes": size, "flows": flows,
            "lookup_ms": min(look_up) * 1e3, "lookup_us_per_entry": min(look_up) * 1e6 / entries,
            "parse_all_ms": min(full) * 1e3, "parse_all_us_per_entry": min(full) * 1e6 / entries}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--flows", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    for n in args.entries:
        r = measure(n, args.flows, args.repeat)
        print(f"{r['entries']:>7} entries ({r['bytes'] / 1e6:.1f} MB), {r['flows']} flows looked up: "
              f"{r['lookup_ms']:.1f} ms ({r['lookup_us_per_entry']:.2f} us/entry); "
              f"parse_line over every line {r['parse_all_ms']:.1f} ms ({r['parse_all_us_per_entry']:.2f} us/entry)")


if __name__ == "__main__":
    main()
