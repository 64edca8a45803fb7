"""TCP traffic drivers run inside a test namespace: `python -m tests.harness.traffic MODE ...`.

Modes (each prints one JSON line at the end: the connections it made, as
{"client": [ip, port], "server": [ip, port]}):
  bulk    both directions send --bytes per connection, every byte read and acknowledged
          by the peer before the sockets close (all data delivered; only FINs may linger).
  syn     --connections non-blocking connects whose SYNs the namespace drops; they are
          abandoned after --seconds (the client retransmits SYNs in SYN_SENT meanwhile).
  synack  clients connect and stay silent, print "ready", wait for "go" on stdin (the
          test lifts the ACK drop), then each sends one byte; the server retransmits
          SYN-ACKs while the handshake's final ACK is being dropped.
  iperf   run iperf3 server + client (for load: demo and bench), see --help.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time

CHUNK = 64 * 1024


def _family(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def _listener(args: argparse.Namespace) -> socket.socket:
    """The server socket: on --server-ip, or with --dual-stack an IPv6 socket on [::] that
    accepts IPv4 too (how Go, Java, nginx and iperf3 listen by default)."""
    if args.dual_stack:
        server = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        address = ("::", args.port)
    else:
        server = socket.socket(_family(args.server_ip), socket.SOCK_STREAM)
        address = (args.server_ip, args.port)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(address)
    server.listen(args.connections + 8)
    return server


def _run_all(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _endpoint(sock: socket.socket) -> list:
    name = sock.getsockname()
    return [name[0], name[1]]


def _send_all_then_drain(sock: socket.socket, nbytes: int) -> None:
    """Send nbytes and half-close while reading the peer's data until its EOF."""
    def send() -> None:
        payload = b"x" * CHUNK
        left = nbytes
        while left > 0:
            n = sock.send(payload[: min(CHUNK, left)])
            left -= n
        sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    while sock.recv(CHUNK):
        pass
    sender.join()


def bulk(args: argparse.Namespace) -> list[dict]:
    server = _listener(args)
    peer_bytes = args.bytes if args.duplex else 0

    def serve_one(conn: socket.socket) -> None:
        with conn:
            _send_all_then_drain(conn, peer_bytes)

    def accept_all() -> None:
        threads = []
        for _ in range(args.connections):
            conn, _addr = server.accept()
            t = threading.Thread(target=serve_one, args=(conn,))
            t.start()
            threads.append(t)
        for t in threads:
            t.join()

    acceptor = threading.Thread(target=accept_all)
    acceptor.start()
    flows = []
    clients = []
    for _ in range(args.connections):
        c = socket.socket(_family(args.server_ip), socket.SOCK_STREAM)
        if args.client_ip:
            c.bind((args.client_ip, 0))
        c.connect((args.server_ip, args.port))
        flows.append({"client": _endpoint(c), "server": [args.server_ip, args.port]})
        clients.append(c)

    def drive(c: socket.socket) -> None:
        with c:
            _send_all_then_drain(c, args.bytes)

    _run_all([threading.Thread(target=drive, args=(c,)) for c in clients])
    acceptor.join()
    server.close()
    return flows


def syn(args: argparse.Namespace) -> list[dict]:
    socks, flows = [], []
    for _ in range(args.connections):
        c = socket.socket(_family(args.server_ip), socket.SOCK_STREAM)
        c.setblocking(False)
        c.connect_ex((args.server_ip, args.port))
        flows.append({"client": _endpoint(c), "server": [args.server_ip, args.port]})
        socks.append(c)
    time.sleep(args.seconds)
    for c in socks:
        c.close()  # a SYN_SENT socket closes silently
    return flows


def synack(args: argparse.Namespace) -> list[dict]:
    server = _listener(args)
    clients, flows = [], []
    for _ in range(args.connections):
        c = socket.socket(_family(args.server_ip), socket.SOCK_STREAM)
        c.connect((args.server_ip, args.port))   # done on the SYN-ACK: the client is ESTABLISHED
        flows.append({"client": _endpoint(c), "server": [args.server_ip, args.port]})
        clients.append(c)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("expected 'go' on stdin")
    for c in clients:
        c.sendall(b"x")   # a data segment completes the server's handshake
    for _ in clients:
        conn, _addr = server.accept()
        with conn:
            conn.recv(1)
    for c in clients:
        c.close()
    server.close()
    return flows


def rr(args: argparse.Namespace) -> list[dict]:
    """Request/response: each client sends a 1-byte request and reads a --bytes response,
    --rounds times on one connection, or for --seconds when --rounds is 0 (the
    response's last segment carries PSH)."""
    server = _listener(args)
    response = b"r" * args.bytes

    def serve(conn: socket.socket) -> None:
        with conn:
            while conn.recv(1):
                conn.sendall(response)

    def accept_all() -> None:
        threads = []
        for _ in range(args.connections):
            conn, _addr = server.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threads.append(threading.Thread(target=serve, args=(conn,)))
            threads[-1].start()
        for t in threads:
            t.join()

    acceptor = threading.Thread(target=accept_all)
    acceptor.start()
    flows = []

    def client() -> None:
        c = socket.socket(_family(args.server_ip), socket.SOCK_STREAM)
        if args.client_ip:
            c.bind((args.client_ip, 0))
        c.connect((args.server_ip, args.port))
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        flows.append({"client": _endpoint(c), "server": [args.server_ip, args.port]})
        ends = time.monotonic() + args.seconds
        with c:
            rounds = 0
            while rounds < args.rounds if args.rounds else time.monotonic() < ends:
                rounds += 1
                c.sendall(b"q")
                left = args.bytes
                while left > 0:
                    chunk = c.recv(CHUNK)
                    if not chunk:
                        raise SystemExit("server closed early")
                    left -= len(chunk)

    _run_all([threading.Thread(target=client) for _ in range(args.connections)])
    acceptor.join()
    server.close()
    return flows


def iperf(args: argparse.Namespace) -> list[dict]:
    """iperf3 server and client on --server-ip for --seconds with --parallel streams."""
    server = subprocess.Popen(["iperf3", "-s", "-1", "-B", args.server_ip, "-p", str(args.port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        subprocess.run(["iperf3", "-c", args.server_ip, "-p", str(args.port), "-t", f"{args.seconds:g}",
                        "-P", str(args.connections)] + (["-R"] if args.duplex else [])
                       + (["-B", args.client_ip] if args.client_ip else []),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    finally:
        server.wait(timeout=30)
    return []


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.traffic")
    parser.add_argument("mode", choices=["bulk", "syn", "synack", "rr", "iperf"])
    parser.add_argument("--server-ip", required=True)
    parser.add_argument("--client-ip", default=None, help="bind clients to this address")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--bytes", type=int, default=1 << 20, help="bulk: bytes per direction")
    parser.add_argument("--dual-stack", action="store_true",
                        help="bulk, synack: the server listens on [::] (IPv6 socket) and clients use --server-ip")
    parser.add_argument("--duplex", action="store_true", help="bulk: the server sends too; iperf: -R")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=100, help="rr: requests per connection (0: for --seconds)")
    args = parser.parse_args(argv)
    flows = {"bulk": bulk, "syn": syn, "synack": synack, "rr": rr, "iperf": iperf}[args.mode](args)
    print(json.dumps(flows), flush=True)


if __name__ == "__main__":
    main()
