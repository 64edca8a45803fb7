"""A receiver with a tiny receive buffer under load: `python -m tests.harness.slowreader`.

The server accepts with the default buffer, so the window it has offered is large, then
shrinks each connection's SO_RCVBUF to --rcvbuf bytes (TCP never takes back a window it
offered) and reads --chunk bytes at a time with a pause between reads; --connections clients
each send --bytes as fast as the kernel takes them. The receiver's kernel then drops the
segments its buffer cannot hold (with the reasons the running kernel gives: memory, zero
window, a pruned out-of-order queue). Prints one JSON line: the connections, as traffic.py's
modes do. (A buffer set before listening drops nothing: the window follows it.)
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server-ip", required=True)
    parser.add_argument("--client-ip", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=2)
    parser.add_argument("--bytes", type=int, default=4 << 20)
    parser.add_argument("--rcvbuf", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=65536)
    parser.add_argument("--pause", type=float, default=0.002, help="seconds between reads")
    args = parser.parse_args()
    family = socket.AF_INET6 if ":" in args.server_ip else socket.AF_INET
    server = socket.socket(family, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((args.server_ip, args.port))
    server.listen(args.connections)
    flows = []

    def receive(conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, args.rcvbuf)
        while conn.recv(args.chunk):
            time.sleep(args.pause)   # a slow application: the buffer stays full
        conn.close()

    def send() -> None:
        client = socket.socket(family, socket.SOCK_STREAM)
        client.bind((args.client_ip, 0))
        client.connect((args.server_ip, args.port))
        flows.append({"client": list(client.getsockname()[:2]), "server": [args.server_ip, args.port]})
        client.sendall(b"x" * args.bytes)
        client.shutdown(socket.SHUT_WR)
        client.recv(1)   # the server's FIN: everything was read
        client.close()

    readers = []
    senders = [threading.Thread(target=send) for _ in range(args.connections)]
    for t in senders:
        t.start()
    for _ in range(args.connections):
        conn, _addr = server.accept()
        readers.append(threading.Thread(target=receive, args=(conn,)))
        readers[-1].start()
    for t in senders + readers:
        t.join()
    print(json.dumps(flows), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
