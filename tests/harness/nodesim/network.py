"""The node simulator's network: each node's address plan, a bridge "CNI plugin" giving
every non-hostNetwork pod a network namespace of its own, and the `kubernetes` Service's
ClusterIP proxied to the apiserver (kube-proxy's job)."""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
import select
import socket
import subprocess
import threading
from dataclasses import dataclass, field

NETNS_PREFIX = "rtsim-"


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


# ---- addresses --------------------------------------------------------------------------

@dataclass
class SimNode:
    """One simulated node and its address plan."""

    name: str
    index: int
    slot: int
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def pod_cidr_v4(self) -> ipaddress.IPv4Network:
        return ipaddress.ip_network(f"198.18.{16 * self.slot + self.index}.0/24")

    @property
    def pod_cidr_v6(self) -> ipaddress.IPv6Network:
        # fd00:0:0::/48 is left alone: this machine's own uplink may sit in fd00::/64.
        return ipaddress.ip_network(f"fd00:0:{self.slot + 1:x}:{self.index:x}::/64")

    @property
    def ip_v4(self) -> str:
        """The node's InternalIP: the pod CIDR's gateway, on the simulator's bridge."""
        return str(self.pod_cidr_v4.network_address + 1)

    @property
    def ip_v6(self) -> str:
        return str(self.pod_cidr_v6.network_address + 1)


def slot_prefixes(slot: int) -> tuple[str, str]:
    """The on-link prefixes shared by all nodes of one simulator (one L2 bridge)."""
    return f"198.18.{16 * slot}.0/20", f"fd00:0:{slot + 1:x}::/48"


# ---- the bridge "CNI plugin" ----------------------------------------------------------------

_sandbox_serial = itertools.count(1)   # names stay unique across simulators in one process


class PodNetwork:
    """A host bridge and one network namespace + veth per pod (like the CNI bridge plugin).
    Names carry this process's pid (bridge rtb<pid>s<slot>, veth rv<pid>x<n>, netns
    rtsim-<pid>-<n>), so a later simulator can remove what a dead one left behind."""

    def __init__(self, slot: int, nodes: list[SimNode]):
        self.slot = slot
        self.tag = f"{os.getpid():x}"
        self.bridge = f"rtb{self.tag}s{slot}"
        self.nodes = nodes
        self._lock = threading.Lock()
        self._used: dict[str, set[int]] = {n.name: set() for n in nodes}

    def setup(self) -> None:
        cleanup_stale()
        run("ip", "link", "add", self.bridge, "type", "bridge", "mcast_snooping", "0")
        run("ip", "link", "set", self.bridge, "up")
        for node in self.nodes:
            self._add_addresses(node)

    def add_node(self, node: SimNode) -> None:
        with self._lock:
            self._used[node.name] = set()
        self._add_addresses(node)

    def remove_node(self, node: SimNode) -> None:
        run("ip", "addr", "del", f"{node.ip_v4}/24", "dev", self.bridge, check=False)
        run("ip", "-6", "addr", "del", f"{node.ip_v6}/64", "dev", self.bridge, check=False)
        with self._lock:
            self._used.pop(node.name, None)

    def _add_addresses(self, node: SimNode) -> None:
        """The node's InternalIPs (its pod CIDRs' gateways) on the bridge."""
        run("ip", "addr", "add", f"{node.ip_v4}/24", "dev", self.bridge)
        run("ip", "-6", "addr", "add", f"{node.ip_v6}/64", "dev", self.bridge, "nodad")

    def add_local_address(self, ip: str) -> None:
        """Make `ip` an address of this host (on the bridge), e.g. the apiserver's ClusterIP."""
        run("ip", "addr", "add", f"{ip}/32", "dev", self.bridge)

    def teardown(self) -> None:
        run("ip", "link", "del", self.bridge, check=False)

    def create(self, node: SimNode) -> "PodSandbox":
        with self._lock:
            used = self._used[node.name]
            k = next(i for i in range(2, 255) if i not in used)
            used.add(k)
        serial = next(_sandbox_serial)
        sb = PodSandbox(
            netns=f"{NETNS_PREFIX}{os.getpid()}-{serial}",
            veth=f"rv{self.tag}x{serial:x}"[:15],
            node=node, host_index=k,
            ip_v4=str(node.pod_cidr_v4.network_address + k),
            ip_v6=str(node.pod_cidr_v6.network_address + k),
        )
        on_link4, on_link6 = slot_prefixes(self.slot)
        try:
            run("ip", "netns", "add", sb.netns)
            run("ip", "link", "add", sb.veth, "type", "veth", "peer", "name", "eth0", "netns", sb.netns)
            run("ip", "link", "set", sb.veth, "master", self.bridge, "up")
            ns = ("ip", "-n", sb.netns)
            run(*ns, "link", "set", "lo", "up")
            run(*ns, "addr", "add", f"{sb.ip_v4}/{on_link4.split('/')[1]}", "dev", "eth0")
            run(*ns, "-6", "addr", "add", f"{sb.ip_v6}/{on_link6.split('/')[1]}", "dev", "eth0", "nodad")
            run(*ns, "link", "set", "eth0", "up")
            # Everything else (ClusterIPs) through the host. Only tests/harness/kubeproxy.py
            # turns forwarding on, and on this bridge alone: nothing leaves this machine.
            run(*ns, "route", "add", "default", "via", node.ip_v4)
            run(*ns, "-6", "route", "add", "default", "via", node.ip_v6)
        except Exception:
            self.release(sb)
            raise
        return sb

    def release(self, sb: "PodSandbox") -> None:
        run("ip", "netns", "del", sb.netns, check=False)
        run("ip", "link", "del", sb.veth, check=False)
        with self._lock:
            self._used[sb.node.name].discard(sb.host_index)


@dataclass
class PodSandbox:
    netns: str
    veth: str
    node: SimNode
    host_index: int
    ip_v4: str
    ip_v6: str


def cleanup_stale() -> None:
    """Remove network namespaces and bridges left by simulators that died (pid not alive)."""
    for line in run("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.match(rf"{NETNS_PREFIX}(\d+)-\d+$", name)
        if m and not pid_alive(int(m.group(1))):
            run("ip", "netns", "del", name, check=False)
    out = run("ip", "-o", "link", "show", "type", "bridge", check=False).stdout
    for m in re.finditer(r"^\d+: (rtb([0-9a-f]+)s\d+):", out, re.M):
        if not pid_alive(int(m.group(2), 16)):
            run("ip", "link", "del", m.group(1), check=False)


# ---- kube-proxy for the `kubernetes` Service --------------------------------------------------

class TcpProxy:
    """Forwards connections accepted on (listen_ip, listen_port) to (target_host, target_port)."""

    def __init__(self, listen_ip: str, listen_port: int, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((listen_ip, listen_port))
        self.sock.listen(64)
        self.sock.settimeout(0.5)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, name="nodesim-proxy", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._pump, args=(conn,), daemon=True).start()

    def _pump(self, conn: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            conn.close()
            return
        upstream.settimeout(None)
        conn.settimeout(None)
        peers = {conn: upstream, upstream: conn}
        try:
            while not self._stop.is_set():
                readable, _, _ = select.select(list(peers), [], [], 1.0)
                for s in readable:
                    data = s.recv(65536)
                    if not data:
                        return
                    peers[s].sendall(data)
        except OSError:
            pass
        finally:
            conn.close()
            upstream.close()

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


_proxies: dict[tuple, list] = {}     # (listen, target) -> [TcpProxy, users]: one per apiserver
_proxies_lock = threading.Lock()


def share_proxy(listen_ip: str, listen_port: int, target_host: str, target_port: int) -> tuple:
    """A TcpProxy shared by the simulators of this process that serve the same cluster."""
    key = (listen_ip, listen_port, target_host, target_port)
    with _proxies_lock:
        entry = _proxies.get(key)
        if entry is None:
            entry = _proxies[key] = [TcpProxy(*key), 0]
        entry[1] += 1
    return key


def release_proxy(key: tuple) -> None:
    with _proxies_lock:
        entry = _proxies.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            entry[0].close()
            del _proxies[key]
