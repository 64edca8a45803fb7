"""A TCP client on the host's network, from a given local address (a hostNetwork pod's or a node
process's: the simulated node's own address), to a server pod: `python -m tests.harness.hostclient
--local-ip IP --server-ip IP --port N [--connections N] [--bytes N]`. Each connection sends
--bytes, half-closes and reads the server's data to its EOF (podtraffic's `serve` is the other
end); prints the flows made as one JSON line."""

from __future__ import annotations

import argparse
import json
import socket
import threading

from tests.harness.traffic import _send_all_then_drain


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.hostclient")
    parser.add_argument("--local-ip", required=True)
    parser.add_argument("--server-ip", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=3)
    parser.add_argument("--bytes", type=int, default=1 << 20)
    args = parser.parse_args()
    family = socket.AF_INET6 if ":" in args.server_ip else socket.AF_INET
    socks, flows = [], []
    for _ in range(args.connections):
        c = socket.socket(family, socket.SOCK_STREAM)
        c.bind((args.local_ip, 0))
        c.connect((args.server_ip, args.port))
        flows.append({"client": list(c.getsockname()[:2]), "server": [args.server_ip, args.port]})
        socks.append(c)
    threads = [threading.Thread(target=_send_all_then_drain, args=(c, args.bytes)) for c in socks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in socks:
        c.close()
    print(json.dumps(flows), flush=True)


if __name__ == "__main__":
    main()
