"""A real kube-proxy (nftables mode) for a node simulator's nodes: Services, EndpointSlices,
ClusterIPs and NodePorts then work between simulated pods on different nodes.

The simulated nodes share this host's network namespace, so ONE kube-proxy serves them all
(it runs as the first node, --hostname-override; with externalTrafficPolicy Cluster every
node programs every Service alike). What the host gets, all of it undone by stop():

- nftables tables `ip kube-proxy` and `ip6 kube-proxy` (kube-proxy's own; deleted at stop).
  Their names are fixed by kube-proxy, so one simulator on this machine at a time may run
  it: a machine-wide lock (HOST_LOCK) is held from start to stop, and tables found while
  holding it were left by a holder that died: they are removed first.
- On the simulator's own bridge only: IPv4 forwarding (net.ipv4.conf.<bridge>.forwarding),
  IPv6 forwarding (net.ipv6.conf.<bridge>.force_forwarding, Linux 6.17+; the global
  net.ipv6.conf.all.forwarding is not touched) and the bridge's own nf_call_iptables /
  nf_call_ip6tables, so a backend's reply to a client on the same bridge (switched at L2)
  still meets conntrack and is un-NATed. These live and die with the bridge.
- None of the global sysctls kube-proxy would set: --conntrack-max-per-core=0 and zero
  conntrack timeouts leave nf_conntrack_* alone; --oom-score-adj=0 leaves its own process'.
- NodePorts only on addresses inside the simulator's on-link prefixes (the nodes' IPs), and
  traffic is forwarded only between the bridge's own addresses: pods reach 198.18.0.0/15,
  198.19.0.0/16 (ClusterIPs) and fd00::/8 of this host's namespaces, nothing else.

The `kubernetes` Service is labelled service.kubernetes.io/service-proxy-name=rtrace-nodesim
so kube-proxy leaves it to the simulator's userspace proxy (its apiserver listens on
127.0.0.1, which no Endpoint may name): the pods' agents and operators keep reaching the API
through it, as before.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

from .controlplane import SLOT_DIR, binaries_dir, end_process, free_port, log_tail, start_process
from .nodesim.network import run, slot_prefixes

HOST_LOCK = SLOT_DIR / "kube-proxy.lock"
TABLES = (("ip", "kube-proxy"), ("ip6", "kube-proxy"))
# kube-proxy skips Services with this label unless it is started with the same name.
PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
APISERVER_PROXY_NAME = "rtrace-nodesim"


class KubeProxyError(RuntimeError):
    pass


def _sysctl_path(family: str, bridge: str, key: str) -> Path:
    return Path(f"/proc/sys/net/{family}/conf/{bridge}/{key}")


class KubeProxy:
    """kube-proxy for `sim` (a started NodeSimulator) against the cluster in `kubeconfig`
    (an admin kubeconfig).

        with KubeProxy(cp.kubeconfig, sim) as kp:   # Services now route between pods
            ...
    """

    def __init__(self, kubeconfig: Any, sim: Any, *, bin_dir: Optional[Path] = None,
                 workdir: Optional[Path] = None, lock_timeout: float = 900.0):
        self.kubeconfig = Path(kubeconfig)
        self.sim = sim
        self.binary = Path(bin_dir or binaries_dir()) / "kube-proxy"
        self.workdir = Path(workdir or sim.state_dir)
        self.log = self.workdir / "kube-proxy.log"
        self.lock_timeout = lock_timeout
        self.proc: Optional[subprocess.Popen] = None
        self.healthz_port = 0
        self._lock_fd: Optional[int] = None
        self._saved: dict[Path, str] = {}
        self._labelled = False

    def __enter__(self) -> "KubeProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- lifecycle --

    def start(self) -> "KubeProxy":
        if not self.binary.exists():
            raise KubeProxyError(f"{self.binary} is missing: run `make k8s-binaries`")
        try:
            self._take_host_lock()
            remove_tables()                       # a dead holder's, if any
            self._exclude_apiserver_service()
            self._open_bridge()
            self._spawn()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None:
            end_process(self.proc)
            self.proc = None
        if self._lock_fd is not None:
            remove_tables()
        for path, value in self._saved.items():
            with contextlib.suppress(OSError):    # the bridge may be gone, and the setting with it
                path.write_text(value)
        self._saved.clear()
        if self.sim.network is not None:
            run("ip", "link", "set", "dev", self.sim.network.bridge, "type", "bridge",
                "nf_call_iptables", "0", "nf_call_ip6tables", "0", check=False)
        if self._labelled:
            with contextlib.suppress(Exception):
                self.sim.core.patch_namespaced_service(
                    "kubernetes", "default", {"metadata": {"labels": {PROXY_NAME_LABEL: None}}})
            self._labelled = False
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

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

    def _exclude_apiserver_service(self) -> None:
        self.sim.core.patch_namespaced_service(
            "kubernetes", "default", {"metadata": {"labels": {PROXY_NAME_LABEL: APISERVER_PROXY_NAME}}})
        self._labelled = True

    def _open_bridge(self) -> None:
        bridge = self.sim.network.bridge
        for path in (_sysctl_path("ipv4", bridge, "forwarding"),
                     _sysctl_path("ipv6", bridge, "force_forwarding")):
            if not path.exists():
                raise KubeProxyError(f"{path} is missing: IPv6 forwarding on one interface alone "
                                     "needs Linux 6.17+ (force_forwarding)")
            self._saved[path] = path.read_text().strip()
            path.write_text("1")
        run("ip", "link", "set", "dev", bridge, "type", "bridge",
            "nf_call_iptables", "1", "nf_call_ip6tables", "1")

    def _spawn(self) -> None:
        v4, v6 = slot_prefixes(self.sim.network.slot)
        self.healthz_port = free_port()
        argv = [
            str(self.binary), f"--kubeconfig={self.kubeconfig}", "--proxy-mode=nftables",
            f"--hostname-override={self.sim.nodes[0].name}",
            f"--cluster-cidr={v4},{v6}",
            f"--nodeport-addresses={v4},{v6}",
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
