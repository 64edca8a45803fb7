"""Lossy TCP between pods with addresses of their own (node-simulator pods), for e2e tests and the demo.

The pods themselves only hold an identity and a network namespace (`sleep infinity`); the
test drives traffic inside those namespaces:

    server, client = PodNet.of(sim, ns, "server"), PodNet.of(sim, ns, "client")
    server.random_loss(10); client.random_loss(10)
    bulk(server, client, server_ip, 5201, connections=4, nbytes=1 << 20)
    server.clear_loss()

Loss is an nftables table of its own (unique name) in the pod's namespace, dropping a
random share of non-SYN TCP segments in both directions; SYN-ACK retransmits come from
dropping the handshake's final ACK at the server. As a process:
    python -m tests.harness.podtraffic serve|connect|synack-serve|synack-connect ...
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from tests.harness.netns import NftLoss
from tests.harness.segsender import counters
from tests.harness.traffic import _send_all_then_drain

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- pods

def pod_manifest(name: str, node: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "main", "image": "pause", "command": ["sleep", "infinity"]}],
        },
    }


def create_pod(core: Any, namespace: str, name: str, node: str, labels: dict[str, str]) -> None:
    core.create_namespaced_pod(namespace, pod_manifest(name, node, labels))


def wait_pod_ips(core: Any, namespace: str, name: str, timeout: float = 60.0) -> list[str]:
    """The pod's IPv4 and IPv6 addresses once it runs (IPv4 first)."""
    deadline = time.monotonic() + timeout
    while True:
        status = json.loads(core.read_namespaced_pod(name, namespace, _preload_content=False).data)["status"]
        ips = [p["ip"] for p in status.get("podIPs") or []]
        if status.get("phase") == "Running" and len(ips) >= 2:
            return sorted(ips, key=lambda ip: ":" in ip)
        if time.monotonic() > deadline:
            raise TimeoutError(f"pod {namespace}/{name} not Running with two addresses after {timeout}s "
                               f"(phase {status.get('phase')}, ips {ips})")
        time.sleep(0.3)


@dataclass
class PodNet(NftLoss):
    """A pod's network namespace: run things in it, inject loss (the rules: NftLoss). `netns`
    is a name for `ip netns exec` (node simulator pods) or a path such as /proc/<pid>/ns/net
    (real-node pods, whose namespaces are mounted only inside the node's own mount namespace)."""

    netns: str
    table: str = ""

    def __post_init__(self) -> None:
        self.table = self.table or f"rtloss_{os.getpid()}_{uuid.uuid4().hex[:6]}"

    @classmethod
    def of(cls, sim: Any, namespace: str, pod: str, timeout: float = 30.0) -> "PodNet":
        deadline = time.monotonic() + timeout
        while True:
            netns = sim.netns(namespace, pod)
            if netns:
                return cls(netns)
            if time.monotonic() > deadline:
                raise TimeoutError(f"pod {namespace}/{pod} has no network namespace")
            time.sleep(0.2)

    def enter(self, *argv: str) -> list[str]:
        """argv run inside the pod's network namespace."""
        if self.netns.startswith("/"):
            return ["nsenter", f"--net={self.netns}", "--", *argv]
        return ["ip", "netns", "exec", self.netns, *argv]

    @property
    def name(self) -> str:
        return self.netns

    def _reset_script(self) -> str:
        # The table is made anew for each rule set ("table" first, so "delete" always has one).
        return (f"table inet {self.table} {{}}\ndelete table inet {self.table}\n"
                f"add table inet {self.table}\n"
                f"add chain inet {self.table} input {{ type filter hook input priority 0; policy accept; }}\n"
                f"add chain inet {self.table} output {{ type filter hook output priority 0; policy accept; }}\n")

    def clear_loss(self) -> None:
        """No loss: the table goes."""
        subprocess.run(self.enter("nft", "delete", "table", "inet", self.table),
                       capture_output=True)

    def python(self, *args: str, **kwargs: Any) -> subprocess.Popen:
        kwargs.setdefault("cwd", str(ROOT))
        return subprocess.Popen(self.enter(sys.executable, "-m", "tests.harness.podtraffic", *args), **kwargs)


def _wait_line(proc: subprocess.Popen, expected: str, timeout: float = 30.0) -> None:
    """The process's next stdout line is `expected`; kill it and fail after `timeout` seconds."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline().strip() if ready else f"(nothing within {timeout:.0f}s)"
    if line != expected:
        proc.kill()
        raise RuntimeError(f"traffic process said {line!r}, expected {expected!r}: {proc.stderr.read()}")


def _finish(proc: subprocess.Popen, timeout: float = 300.0) -> list:
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"traffic process failed ({proc.returncode}): {err}")
    lines = out.strip().splitlines()
    return json.loads(lines[-1]) if lines else []


def bulk(server: PodNet, client: PodNet, server_ip: str, port: int, connections: int = 4,
         nbytes: int = 1 << 20, listen_ip: Optional[str] = None,
         listen_port: Optional[int] = None) -> list[dict]:
    """Duplex bulk transfer from the client pod to the server pod; returns the flows made.
    listen_ip, listen_port: where the server listens ("::": dual-stack), default server_ip and
    port (a Service's address and port lead elsewhere: its targetPort on the pod)."""
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    srv = server.python("serve", "--ip", listen_ip or server_ip, "--port", str(listen_port or port),
                        "--connections", str(connections), "--bytes", str(nbytes), **pipes)
    _wait_line(srv, "listening")
    cli = client.python("connect", "--server-ip", server_ip, "--port", str(port),
                        "--connections", str(connections), "--bytes", str(nbytes), **pipes)
    flows = _finish(cli)
    _finish(srv)
    return flows


def synack(server: PodNet, client: PodNet, server_ip: str, port: int, connections: int = 3,
           seconds: float = 3.5) -> list[dict]:
    """The server pod retransmits SYN-ACKs while the handshake's final ACKs are dropped."""
    pipes = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    server.drop_handshake_acks(port)
    try:
        srv = server.python("synack-serve", "--ip", server_ip, "--port", str(port),
                            "--connections", str(connections), **pipes)
        _wait_line(srv, "listening")
        cli = client.python("synack-connect", "--server-ip", server_ip, "--port", str(port),
                            "--connections", str(connections), **pipes)
        _wait_line(cli, "ready")
        time.sleep(seconds)  # SYN-ACK retransmits at 1 s, 3 s, ...
    finally:
        server.clear_loss()
    cli.stdin.write("go\n")
    cli.stdin.flush()
    flows = _finish(cli)
    _finish(srv)
    return flows


# ---------------------------------------------------------------- the processes

def _listen(ip: str, port: int, backlog: int) -> socket.socket:
    """A listener on ip:port; "::" is a dual-stack listener (IPv4 clients too), the way Go,
    Java and nginx listen by default."""
    s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
    if ip == "::":
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, port))
    s.listen(backlog)
    print("listening", flush=True)
    return s


def _serve(args: argparse.Namespace) -> list:
    server = _listen(args.ip, args.port, args.connections + 8)
    threads = []
    for _ in range(args.connections):
        conn, _ = server.accept()
        t = threading.Thread(target=lambda c=conn: (_send_all_then_drain(c, args.bytes), c.close()))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    server.close()
    return []


def _open_connections(args: argparse.Namespace) -> tuple[list[socket.socket], list[dict]]:
    """args.connections connected sockets to the server, and each one's flow (both ends)."""
    family = socket.AF_INET6 if ":" in args.server_ip else socket.AF_INET
    socks, flows = [], []
    for _ in range(args.connections):
        c = socket.socket(family, socket.SOCK_STREAM)
        c.connect((args.server_ip, args.port))
        name = c.getsockname()
        flows.append({"client": [name[0], name[1]], "server": [args.server_ip, args.port]})
        socks.append(c)
    return socks, flows


def _connect(args: argparse.Namespace) -> list:
    """Each flow also carries the client socket's own counters once the server's EOF came
    (it read all the client sent, so nothing is left to retransmit): total_retrans and
    data_segs_out from TCP_INFO, the reference for the ratios the agents read."""
    socks, flows = _open_connections(args)

    def run(sock: socket.socket, flow: dict) -> None:
        _send_all_then_drain(sock, args.bytes)
        counted = counters(sock)
        flow.update(total_retrans=counted["total_retrans"], data_segs_out=counted["data_segs_out"])
        sock.close()
    threads = [threading.Thread(target=run, args=(c, f)) for c, f in zip(socks, flows)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return flows


def _synack_serve(args: argparse.Namespace) -> list:
    server = _listen(args.ip, args.port, args.connections + 8)
    for _ in range(args.connections):
        conn, _ = server.accept()
        with conn:
            conn.recv(1)
    server.close()
    return []


def _synack_connect(args: argparse.Namespace) -> list:
    socks, flows = _open_connections(args)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("expected 'go' on stdin")
    for c in socks:
        c.sendall(b"x")
    time.sleep(0.5)
    for c in socks:
        c.close()
    return flows


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.podtraffic")
    parser.add_argument("mode", choices=["serve", "connect", "synack-serve", "synack-connect"])
    parser.add_argument("--ip")
    parser.add_argument("--server-ip")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--bytes", type=int, default=1 << 20)
    args = parser.parse_args(argv)
    run = {"serve": _serve, "connect": _connect, "synack-serve": _synack_serve,
           "synack-connect": _synack_connect}[args.mode]
    print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main()
