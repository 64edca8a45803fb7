"""A real kube-proxy (nftables mode) for the test cluster's nodes: Services, EndpointSlices,
ClusterIPs and NodePorts then work between pods, simulated or real, on different nodes.

kube-proxy programs one network namespace, and every node of the test cluster shares this
host's: the node simulator's nodes (one bridge per simulator) and the real kubelet node
(tests/harness/realnode.py, its own CNI bridge). So ONE kube-proxy serves every bridge on the
host (`Network`: a bridge and the prefixes of its pods and node addresses), as the first
network's node (--hostname-override; with externalTrafficPolicy Cluster every node programs
every Service alike):

    with KubeProxy(cp.kubeconfig, simulator_network(sim)) as kp:            # simulated nodes
    with KubeProxy(cp.kubeconfig, real_node_network(node)) as kp:           # the real node
    with KubeProxy(cp.kubeconfig, simulator_network(sim), real_node_network(node)):   # both

What the host gets, all of it undone by stop():

- nftables tables `ip kube-proxy` and `ip6 kube-proxy` (kube-proxy's own; deleted at stop).
  Their names are fixed by kube-proxy, so one kube-proxy on this machine at a time may run:
  a machine-wide lock (HOST_LOCK) is held from start to stop, and tables found while
  holding it were left by a holder that died: they are removed first.
- On each served bridge only: IPv4 forwarding (net.ipv4.conf.<bridge>.forwarding), IPv6
  forwarding (net.ipv6.conf.<bridge>.force_forwarding, Linux 6.17+; the global
  net.ipv6.conf.all.forwarding is not touched) and the bridge's own nf_call_iptables /
  nf_call_ip6tables, so a backend's reply to a client on the same bridge (switched at L2)
  still meets conntrack and is un-NATed. These live and die with the bridge.
- None of the global sysctls kube-proxy would set: --conntrack-max-per-core=0 and zero
  conntrack timeouts leave nf_conntrack_* alone; --oom-score-adj=0 leaves its own process'.
- NodePorts only on addresses inside the served prefixes (the nodes' IPs), and traffic is
  forwarded only between the bridges' own addresses: pods reach 198.18.0.0/15 (pods, nodes
  and ClusterIPs) and fd00::/8 of this host's namespaces, nothing else.
- --cluster-cidr takes one prefix per family: the smallest prefix of each family that holds
  every served one (cluster_cidrs), so traffic from any served pod to a ClusterIP keeps its
  source address (no masquerade inside the cluster), as on a real cluster.

The `kubernetes` Service is programmed by kube-proxy like any other. Its apiserver listens
on 127.0.0.1, which no Endpoint may name (the control plane runs no endpoint reconciler), so
start() gives it an EndpointSlice of its own (KUBERNETES_SLICE) naming the first network's
relay address (a node IPv4 address of this host) at port 443, where a relay (nodesim's
TcpProxy) forwards to the apiserver. Why not leave that Service out of kube-proxy's rules
(label service.kubernetes.io/service-proxy-name, as an earlier version did): kube-proxy then
drops every new connection to a service-range address it did not program ("Drop traffic to
unallocated ClusterIPs", from the filter output and forward hooks), and host processes
(hostNetwork agents on a real node) dialling the `kubernetes` ClusterIP timed out.
Programmed, the ClusterIP reaches the apiserver through kube-proxy's DNAT the whole time it
runs, and through the simulator's or the real node's relay on the ClusterIP itself before
and after.

stop() checks that the host is as it was before start() (HostState: no `kube-proxy` table,
the same forwarding and bridge settings, the same conntrack and forwarding sysctls) and
raises KubeProxyError naming what differs: a test session must not leave rules behind that
drop or route other tests' traffic.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence
from urllib.parse import urlparse

from .controlplane import SLOT_DIR, binaries_dir, end_process, free_port, log_tail, start_process
from .nodesim.network import release_proxy, run, share_proxy, slot_prefixes

HOST_LOCK = SLOT_DIR / "kube-proxy.lock"
TABLES = (("ip", "kube-proxy"), ("ip6", "kube-proxy"))
# kube-proxy skips Services with this label unless it is started with the same name (an
# earlier version of this harness set it on the `kubernetes` Service: removed at start).
PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
KUBERNETES_SLICE = "kubernetes-rtrace-relay"   # the `kubernetes` Service's EndpointSlice
APISERVER_RELAY_PORT = 443
# Host-wide settings kube-proxy could change (it is told not to: --conntrack-* 0), compared
# before and after.
GLOBAL_SYSCTLS = (
    "net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding", "net.ipv4.conf.all.forwarding",
    "net.ipv4.conf.all.route_localnet", "net.netfilter.nf_conntrack_max",
    "net.netfilter.nf_conntrack_tcp_timeout_established", "net.netfilter.nf_conntrack_tcp_timeout_close_wait",
    "net.netfilter.nf_conntrack_tcp_be_liberal", "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
)


class KubeProxyError(RuntimeError):
    pass


@dataclass(frozen=True)
class Network:
    """One bridge of this host whose pods kube-proxy serves."""

    bridge: str
    prefixes: tuple[str, ...]   # the pods' and the nodes' addresses: an IPv4 and an IPv6 prefix
    node: str                   # a node on it (the first network's is kube-proxy's --hostname-override)
    relay_ip: str               # a node IPv4 address of this host on it (see KUBERNETES_SLICE)


def simulator_network(sim: Any) -> Network:
    """The bridge of a started NodeSimulator (all its nodes)."""
    first = sim.nodes[0]
    return Network(bridge=sim.network.bridge, prefixes=slot_prefixes(sim.network.slot),
                   node=first.name, relay_ip=first.ip_v4)


def real_node_network(node: Any) -> Network:
    """The CNI bridge of a started RealNode."""
    from .realnode import BRIDGE, NODE_IP, POD_CIDR_V4, POD_CIDR_V6

    return Network(bridge=BRIDGE, prefixes=(str(POD_CIDR_V4), str(POD_CIDR_V6)), node=node.name, relay_ip=NODE_IP)


def cluster_cidrs(networks: Sequence[Network]) -> list[str]:
    """kube-proxy's --cluster-cidr: one prefix per family (its limit), the smallest that holds
    every served prefix of that family."""
    out = []
    for version in (4, 6):
        prefixes = [ipaddress.ip_network(p) for n in networks for p in n.prefixes
                    if ipaddress.ip_network(p).version == version]
        if not prefixes:
            continue
        cover = prefixes[0]
        while not all(p.subnet_of(cover) for p in prefixes):
            cover = cover.supernet()
        out.append(str(cover))
    return out


def _sysctl_path(family: str, bridge: str, key: str) -> Path:
    return Path(f"/proc/sys/net/{family}/conf/{bridge}/{key}")


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except OSError:
        return None


@dataclass(frozen=True)
class HostState:
    """What kube-proxy and this harness may change on the host, as read now."""

    tables: tuple[str, ...]                  # kube-proxy's nftables tables present
    settings: tuple[tuple[str, Optional[str]], ...]   # sysctls and the bridge's nf_call_* (None: absent)

    @classmethod
    def read(cls, bridges: Sequence[str]) -> "HostState":
        paths = [Path("/proc/sys") / name.replace(".", "/") for name in GLOBAL_SYSCTLS]
        for bridge in bridges:
            paths += [_sysctl_path("ipv4", bridge, "forwarding"), _sysctl_path("ipv6", bridge, "force_forwarding"),
                      Path(f"/sys/class/net/{bridge}/bridge/nf_call_iptables"),
                      Path(f"/sys/class/net/{bridge}/bridge/nf_call_ip6tables")]
        return cls(tables=tuple(f"{f} {n}" for f, n in TABLES if table_exists(f, n)),
                   settings=tuple((str(p), _read(p)) for p in paths))

    def differences(self, later: "HostState") -> list[str]:
        said = [f"nftables table {t} left behind" for t in later.tables if t not in self.tables]
        before = dict(self.settings)
        # A setting that is gone went with its bridge: nothing of it is left behind.
        said += [f"{path} is {value}, was {before[path]}" for path, value in later.settings
                 if path in before and value is not None and value != before[path]]
        return said


class KubeProxy:
    """kube-proxy for `networks` (at least one) against the cluster in `kubeconfig` (an admin
    kubeconfig); its log and state in `workdir` (default: beside the kubeconfig).

        with KubeProxy(cp.kubeconfig, simulator_network(sim)) as kp:   # Services now route between pods
            ...
    """

    def __init__(self, kubeconfig: Any, *networks: Network, bin_dir: Optional[Path] = None,
                 workdir: Optional[Path] = None, lock_timeout: float = 900.0):
        if not networks:
            raise ValueError("KubeProxy serves at least one Network")
        self.kubeconfig = Path(kubeconfig)
        self.networks = networks
        self.binary = Path(bin_dir or binaries_dir()) / "kube-proxy"
        self.workdir = Path(workdir or self.kubeconfig.parent)
        self.log = self.workdir / "kube-proxy.log"
        self.lock_timeout = lock_timeout
        self.proc: Optional[subprocess.Popen] = None
        self.healthz_port = 0
        self._lock_fd: Optional[int] = None
        self._saved: dict[Path, str] = {}
        self._relay: Optional[tuple] = None       # the apiserver relay the `kubernetes` slice names
        self._slice_made = False
        self._before: Optional[HostState] = None
        self._api: Any = None

    def __enter__(self) -> "KubeProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(verify=exc[0] is None)

    # -- lifecycle --

    def start(self) -> "KubeProxy":
        if not self.binary.exists():
            raise KubeProxyError(f"{self.binary} is missing: run `make k8s-binaries`")
        try:
            self._take_host_lock()
            remove_tables()                       # a dead holder's, if any
            self._before = HostState.read(self._bridges())
            self._route_apiserver_service()
            for network in self.networks:
                self._open_bridge(network.bridge)
            self._spawn()
        except BaseException:
            self.stop(verify=False)
            raise
        return self

    def stop(self, verify: bool = True) -> None:
        """Stop kube-proxy and undo what start() did; with `verify`, raise KubeProxyError when
        the host is not as before start()."""
        if self.proc is not None:
            end_process(self.proc)
            self.proc = None
        if self._lock_fd is not None:
            remove_tables()
        for path, value in self._saved.items():
            with contextlib.suppress(OSError):    # the bridge may be gone, and the setting with it
                path.write_text(value)
        self._saved.clear()
        if self._slice_made:
            with contextlib.suppress(Exception):
                self._discovery().delete_namespaced_endpoint_slice(KUBERNETES_SLICE, "default")
            self._slice_made = False
        if self._relay is not None:
            release_proxy(self._relay)
            self._relay = None
        differences = self._before.differences(HostState.read(self._bridges())) if self._before else []
        self._before = None
        if self._api is not None:
            self._api.close()
            self._api = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if verify and differences:
            raise KubeProxyError("kube-proxy stopped, but the host is not as before it started: "
                                 + "; ".join(differences))

    # -- steps --

    def _take_host_lock(self) -> None:
        SLOT_DIR.mkdir(parents=True, exist_ok=True)
        fd = os.open(HOST_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    holder = HOST_LOCK.read_text().strip() or "?"
                    os.close(fd)
                    raise KubeProxyError(
                        f"another simulator (pid {holder}) runs this machine's kube-proxy "
                        f"({HOST_LOCK}) and kept it for {self.lock_timeout:.0f}s: its nftables "
                        "tables `kube-proxy` have fixed names, so only one can run at a time")
                time.sleep(1.0)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _bridges(self) -> list[str]:
        return [network.bridge for network in self.networks]

    def _client(self) -> Any:
        import kubernetes

        if self._api is None:
            self._api = kubernetes.config.new_client_from_config(config_file=str(self.kubeconfig))
        return self._api

    def _discovery(self) -> Any:
        import kubernetes

        return kubernetes.client.DiscoveryV1Api(self._client())

    def _route_apiserver_service(self) -> None:
        """The `kubernetes` Service gets an endpoint kube-proxy can DNAT to: a relay on the
        first network's relay address (see the module's docstring)."""
        import kubernetes

        core = kubernetes.client.CoreV1Api(self._client())
        core.patch_namespaced_service(   # a label an earlier harness set: kube-proxy would skip it
            "kubernetes", "default", {"metadata": {"labels": {PROXY_NAME_LABEL: None}}})
        service = core.read_namespaced_service("kubernetes", "default")
        api = urlparse(self._client().configuration.host)
        relay_ip = self.networks[0].relay_ip
        self._relay = share_proxy(relay_ip, APISERVER_RELAY_PORT, api.hostname, api.port or 443)
        port_name = service.spec.ports[0].name
        body = {
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": KUBERNETES_SLICE, "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "kubernetes",
                                    "endpointslice.kubernetes.io/managed-by": "rtrace-nodesim"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [relay_ip], "conditions": {"ready": True}}],
            "ports": [{"name": port_name, "port": APISERVER_RELAY_PORT, "protocol": "TCP"}],
        }
        discovery = self._discovery()
        with contextlib.suppress(Exception):      # a dead holder's
            discovery.delete_namespaced_endpoint_slice(KUBERNETES_SLICE, "default")
        discovery.create_namespaced_endpoint_slice("default", body)
        self._slice_made = True

    def _open_bridge(self, bridge: str) -> None:
        for path in (_sysctl_path("ipv4", bridge, "forwarding"),
                     _sysctl_path("ipv6", bridge, "force_forwarding")):
            if not path.exists():
                raise KubeProxyError(f"{path} is missing: IPv6 forwarding on one interface alone "
                                     "needs Linux 6.17+ (force_forwarding)")
            self._saved[path] = path.read_text().strip()
            path.write_text("1")
        for name in ("nf_call_iptables", "nf_call_ip6tables"):
            path = Path(f"/sys/class/net/{bridge}/bridge/{name}")
            self._saved[path] = path.read_text().strip()
        run("ip", "link", "set", "dev", bridge, "type", "bridge",
            "nf_call_iptables", "1", "nf_call_ip6tables", "1")

    def _spawn(self) -> None:
        self.healthz_port = free_port()
        served = [prefix for network in self.networks for prefix in network.prefixes]
        argv = [
            str(self.binary), f"--kubeconfig={self.kubeconfig}", "--proxy-mode=nftables",
            f"--hostname-override={self.networks[0].node}",
            f"--cluster-cidr={','.join(cluster_cidrs(self.networks))}",
            f"--nodeport-addresses={','.join(served)}",
            "--conntrack-max-per-core=0", "--conntrack-tcp-timeout-established=0",
            "--conntrack-tcp-timeout-close-wait=0", "--oom-score-adj=0",
            f"--metrics-bind-address=127.0.0.1:{free_port()}",
            f"--healthz-bind-address=127.0.0.1:{self.healthz_port}",
            "--v=2",
        ]
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = start_process(argv, self.log)
        deadline = time.monotonic() + 120
        while not self._healthy():
            if self.proc.poll() is not None:
                raise KubeProxyError(f"kube-proxy exited ({self.proc.returncode}): see {self.log}:\n"
                                     + log_tail(self.log))
            if time.monotonic() > deadline:
                raise KubeProxyError(f"kube-proxy not healthy after 120s: see {self.log}")
            time.sleep(0.3)

    def _healthy(self) -> bool:
        """Its healthz answers 200 once it has synced the rules at least once."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.healthz_port}/healthz", timeout=2) as r:
                return r.status == 200 and all(table_exists(*t) for t in TABLES)
        except OSError:
            return False


def table_exists(family: str, name: str) -> bool:
    return subprocess.run(["nft", "list", "table", family, name], capture_output=True).returncode == 0


def remove_tables() -> None:
    for family, name in TABLES:
        run("nft", "delete", "table", family, name, check=False)
