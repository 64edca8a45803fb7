"""A node simulator: plays kubelet (plus a bridge CNI plugin and kube-proxy for the
`kubernetes` Service) for Node objects it registers, so pods bound to them really run.

What it does for each simulated node (node-a, node-b, ...):
  - registers the Node (labels kubernetes.io/os=linux, kubernetes.io/hostname, ...; podCIDRs
    198.18.<16*slot+i>.0/24 and fd00:0:<slot+1>:<i>::/64) and keeps it Ready: a Lease in
    kube-node-lease renewed every 10 s, node status re-posted every 30 s;
  - watches pods whose spec.nodeName is one of its nodes and, for each:
      * hostNetwork: runs it in the host's network namespace; status.podIP = the node's IP;
      * otherwise: a network namespace of its own (unique name), a veth into a host bridge,
        an IPv4 and an IPv6 address from the node's pod CIDRs, reported as status.podIP/podIPs.
        All pods of one simulator share the bridge (as with the CNI bridge plugin), so pods
        on different simulated nodes reach each other directly;
      * asks the TokenRequest API for a token bound to the pod (audience: the apiserver's)
        and hands it to the process as a kubeconfig in the pod's private dir ($KUBECONFIG),
        so RBAC applies as in a real pod; the token, ca.crt and namespace files are in
        <pod dir>/serviceaccount/ too. Pods in their own netns reach the apiserver through
        the `kubernetes` Service's ClusterIP, which the simulator proxies (kube-proxy's job);
      * runs each container's command + args as a local process (root, host paths, host
        mount namespace) with the pod's env: value, valueFrom fieldRef (metadata.name,
        metadata.namespace, metadata.uid, metadata.labels/annotations['k'], spec.nodeName,
        spec.serviceAccountName, status.podIP(s), status.hostIP(s)), configMapKeyRef,
        secretKeyRef, resourceFieldRef, envFrom; $(VAR) references expanded as kubelet does;
      * posts pod status: Pending, then Running with Ready/ContainersReady while every
        container's process is alive (and its readinessProbe, httpGet/tcpSocket/exec,
        passes when it has one), containerStatuses with restartCount and last exit;
        restarts on exit per restartPolicy with a capped backoff; Succeeded/Failed when done;
      * on deletion: SIGTERM, SIGKILL after the grace period, then removes the pod object
        (grace 0) as kubelet does, and the network namespace.
  - Each container's stdout/stderr go to <state>/pods/<namespace>_<pod>_<uid>/<container>.log
    (`NodeSimulator.log_path(...)`).

Not simulated: images (a container without `command` runs `image_entrypoints[image]` if
given, else fails with reason NoCommand), volumes other than hostPath (paths are the host's
own), liveness/startup probes, resource limits, `kubectl logs/exec` (no kubelet API).

Use it from Python (threads in this process) or from the command line:
    python -m tests.harness.nodesim --kubeconfig admin.kubeconfig --nodes node-a,node-b
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import ipaddress
import itertools
import json
import logging
import os
import platform
import re
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .controlplane import (
    SERVICE_ACCOUNT_ISSUER, acquire_slot, end_process, kubeconfig_document,
    kubernetes_version, start_process, write_kubeconfig,
)

log = logging.getLogger("rtrace.nodesim")

LEASE_SECONDS = 40
LEASE_RENEW_SECONDS = 10
NODE_STATUS_SECONDS = 30
# kubelet asks for 3607 s: the apiserver then extends a pod-bound token to a year
# (--service-account-extend-token-expiration), so a long-running agent never needs a refresh.
TOKEN_SECONDS = 3607
NETNS_PREFIX = "rtsim-"
MERGE = "application/merge-patch+json"                  # lists replaced whole
STRATEGIC = "application/strategic-merge-patch+json"    # lists merged by key (pod conditions)


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


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
            # Everything else (the apiserver's ClusterIP) through the host; the host does not
            # forward, so nothing leaves this machine.
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


# ---- pods ---------------------------------------------------------------------------------

_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(value: str, env: dict[str, str]) -> str:
    """kubelet's $(VAR) expansion: known names are replaced, $$ escapes, others stay."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return _VAR_REF.sub(sub, value)


def field_path(pod: dict, path: str, sandbox_ips: list[str], host_ips: list[str]) -> str:
    meta, spec = pod["metadata"], pod["spec"]
    m = re.match(r"metadata\.(labels|annotations)\['(.+)'\]$", path)
    if m:
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    simple = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta["uid"],
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": sandbox_ips[0] if sandbox_ips else "",
        "status.podIPs": ",".join(sandbox_ips),
        "status.hostIP": host_ips[0],
        "status.hostIPs": ",".join(host_ips),
    }
    if path not in simple:
        raise ValueError(f"fieldRef {path!r} is not supported by the node simulator")
    return simple[path]


@dataclass
class ContainerRun:
    """One container of a pod: its process, restarts and readiness."""

    spec: dict
    log_path: Path
    proc: Optional[subprocess.Popen] = None
    restarts: int = 0
    started_at: Optional[str] = None
    last_terminated: Optional[dict] = None
    terminated: Optional[dict] = None      # final state (no more restarts)
    waiting: Optional[dict] = None         # {"reason": ..., "message": ...}
    next_start: float = 0.0
    backoff: float = 0.0
    ready: bool = False
    probe_ok: int = 0
    probe_fail: int = 0
    next_probe: float = 0.0

    @property
    def name(self) -> str:
        return self.spec["name"]

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class PodWorker(threading.Thread):
    """Runs one pod from binding to deletion."""

    def __init__(self, sim: "NodeSimulator", pod: dict):
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.sim = sim
        self.pod = pod
        self.uid = meta["uid"]
        self.namespace, self.pod_name = meta["namespace"], meta["name"]
        self.node = sim.nodes_by_name[pod["spec"]["nodeName"]]
        self.dir = sim.state_dir / "pods" / f"{self.namespace}_{self.pod_name}_{self.uid[:8]}"
        self.changed = threading.Event()
        self.gone = threading.Event()        # the pod object no longer exists
        self.stopping = threading.Event()    # the simulator is shutting down
        self.sandbox: Optional[PodSandbox] = None
        self.containers: list[ContainerRun] = []
        self.start_time = now_iso()
        self.transitions: dict[str, tuple[str, str]] = {}
        self._last_status: Optional[str] = None
        self.kubeconfig_path: Optional[Path] = None

    # -- events from the watch --

    def update(self, pod: dict) -> None:
        self.pod = pod
        self.changed.set()

    def deleted(self) -> None:
        self.gone.set()
        self.changed.set()

    def stop(self) -> None:
        self.stopping.set()
        self.changed.set()

    # -- main --

    @property
    def host_network(self) -> bool:
        return bool(self.pod["spec"].get("hostNetwork"))

    @property
    def pod_ips(self) -> list[str]:
        if self.host_network:
            return [self.node.ip_v4, self.node.ip_v6]
        if self.sandbox:
            return [self.sandbox.ip_v4, self.sandbox.ip_v6]
        return []

    def run(self) -> None:
        try:
            self._run()
        except Exception as e:  # a pod must never take the simulator down
            log.exception("pod %s/%s: %s", self.namespace, self.pod_name, e)
            with contextlib.suppress(Exception):
                self._post_status(phase="Failed", message=f"node simulator: {e}")
            while not (self.gone.is_set() or self.stopping.is_set() or self._deleting()):
                self.changed.wait(1.0)
                self.changed.clear()
            if self._deleting() and not self.stopping.is_set():
                self._finalize_delete()
        finally:
            # On simulator shutdown a pod still gets a short SIGTERM grace (an agent's final flush).
            self._kill_all(grace=min(self._grace(), 5) if self.stopping.is_set() else self._grace())
            if self.sandbox:
                self.sim.network.release(self.sandbox)
                self.sandbox = None
            self.sim._worker_done(self)

    def _run(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.containers = [
            ContainerRun(c, self.dir / f"{c['name']}.log") for c in self.pod["spec"]["containers"]]
        if not self.host_network:
            self.sandbox = self.sim.network.create(self.node)
        self._write_credentials()
        self._post_status()
        self._run_init_containers()
        policy = self.pod["spec"].get("restartPolicy", "Always")
        while True:
            if self.gone.is_set() or self.stopping.is_set():
                return
            if self._deleting():
                self._kill_all(self._grace())
                self._post_status()
                self._finalize_delete()
                return
            now = time.monotonic()
            for c in self.containers:
                self._tend(c, policy, now)
            self._probe_all(now)
            self._post_status()
            self.changed.wait(0.2)
            self.changed.clear()

    def _deleting(self) -> bool:
        return bool(self.pod["metadata"].get("deletionTimestamp"))

    def _grace(self) -> float:
        g = self.pod["metadata"].get("deletionGracePeriodSeconds")
        if g is None:
            g = self.pod["spec"].get("terminationGracePeriodSeconds", 30)
        return float(g)

    # -- containers --

    def _tend(self, c: ContainerRun, policy: str, now: float) -> None:
        if c.terminated is not None or c.running():
            return
        if c.proc is not None:  # it exited: record it and decide about a restart
            code = c.proc.returncode
            c.last_terminated = {"exitCode": code if code >= 0 else 128 - code,
                                 "reason": "Completed" if code == 0 else "Error",
                                 "startedAt": c.started_at, "finishedAt": now_iso()}
            c.proc = None
            c.ready = False
            if policy == "Never" or (policy == "OnFailure" and code == 0):
                c.terminated, c.last_terminated = c.last_terminated, None
                return
            c.backoff = min(max(c.backoff * 2, self.sim.restart_backoff), self.sim.max_restart_backoff)
            c.next_start = now + c.backoff
            c.waiting = {"reason": "CrashLoopBackOff",
                         "message": f"back-off {c.backoff:g}s restarting failed container={c.name}"}
            c.restarts += 1
            return
        if now < c.next_start:
            return
        self._start_container(c)

    def _start_container(self, c: ContainerRun) -> None:
        try:
            argv, env, cwd = self._command(c.spec)
        except Exception as e:
            c.waiting = {"reason": "CreateContainerConfigError", "message": str(e)}
            c.next_start = time.monotonic() + 5
            return
        if self.sandbox:
            argv = ["nsenter", f"--net=/run/netns/{self.sandbox.netns}", "--"] + argv
        with open(c.log_path, "a") as f:
            f.write(f"--- node simulator: start #{c.restarts} at {now_iso()}: {argv}\n")
        try:
            c.proc = start_process(argv, c.log_path, env=env, cwd=cwd)
        except OSError as e:
            c.waiting = {"reason": "RunContainerError", "message": str(e)}
            c.next_start = time.monotonic() + max(c.backoff, self.sim.restart_backoff)
            return
        c.started_at = now_iso()
        c.waiting = None
        c.probe_ok = c.probe_fail = 0
        probe = c.spec.get("readinessProbe")
        c.ready = probe is None
        c.next_probe = time.monotonic() + (probe or {}).get("initialDelaySeconds", 0)
        # Exited quickly with a success and restartPolicy Never: handled by _tend next loop.

    def _run_init_containers(self) -> None:
        for spec in self.pod["spec"].get("initContainers") or []:
            c = ContainerRun(spec, self.dir / f"{spec['name']}.log")
            while True:
                self._start_container(c)
                while c.running():
                    if self._deleting() or self.gone.is_set() or self.stopping.is_set():
                        end_process(c.proc, self._grace())
                        return
                    self.changed.wait(0.2)
                    self.changed.clear()
                if c.proc is not None and c.proc.returncode == 0:
                    break
                if self.pod["spec"].get("restartPolicy") == "Never":
                    raise RuntimeError(f"init container {c.name} failed")
                time.sleep(self.sim.restart_backoff)

    def _kill_all(self, grace: float) -> None:
        procs = [c.proc for c in self.containers if c.running()]
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                end_process(p, grace=0)
        for c in self.containers:
            if c.proc is not None and c.proc.poll() is not None:
                code = c.proc.returncode
                c.terminated = {"exitCode": code if code >= 0 else 128 - code,
                                "reason": "Completed" if code == 0 else "Error",
                                "startedAt": c.started_at, "finishedAt": now_iso()}
                c.proc = None
                c.ready = False

    def _command(self, spec: dict) -> tuple[list[str], dict[str, str], str]:
        env = self._env(spec)
        command = list(spec.get("command") or [])
        if not command:
            command = list(self.sim.image_entrypoints.get(spec.get("image", ""), []))
        if not command:
            raise ValueError(
                f"container {spec['name']} has no command and image {spec.get('image')!r} has no "
                "entrypoint in NodeSimulator.image_entrypoints: the simulator cannot run images")
        argv = [expand(a, env) for a in command + list(spec.get("args") or [])]
        cwd = spec.get("workingDir") or str(self.dir)
        return argv, env, cwd

    def _env(self, spec: dict) -> dict[str, str]:
        env: dict[str, str] = {
            "PATH": self.sim.path,
            # A hostNetwork pod has its node's hostname (no UTS namespace here: `hostname` says the host's).
            "HOSTNAME": self.node.name if self.host_network else self.pod_name,
            "HOME": os.environ.get("HOME", "/root"),
        }
        svc = self.sim.apiserver_service
        if svc:
            env["KUBERNETES_SERVICE_HOST"], env["KUBERNETES_SERVICE_PORT"] = svc[0], str(svc[1])
        if self.kubeconfig_path:
            env["KUBECONFIG"] = str(self.kubeconfig_path)
        host_ips = [self.node.ip_v4, self.node.ip_v6]
        for src in spec.get("envFrom") or []:
            prefix = src.get("prefix", "")
            if "configMapRef" in src:
                data = self.sim.read_config_map(self.namespace, src["configMapRef"]["name"],
                                                src["configMapRef"].get("optional", False))
            else:
                data = self.sim.read_secret(self.namespace, src["secretRef"]["name"],
                                            src["secretRef"].get("optional", False))
            env.update({prefix + k: v for k, v in data.items()})
        for var in spec.get("env") or []:
            name = var["name"]
            if "valueFrom" not in var:
                env[name] = expand(var.get("value", ""), env)
                continue
            ref = var["valueFrom"]
            if "fieldRef" in ref:
                env[name] = field_path(self.pod, ref["fieldRef"]["fieldPath"], self.pod_ips, host_ips)
            elif "configMapKeyRef" in ref:
                r = ref["configMapKeyRef"]
                data = self.sim.read_config_map(self.namespace, r["name"], r.get("optional", False))
                if r["key"] in data:
                    env[name] = data[r["key"]]
                elif not r.get("optional"):
                    raise ValueError(f"configmap {r['name']} has no key {r['key']}")
            elif "secretKeyRef" in ref:
                r = ref["secretKeyRef"]
                data = self.sim.read_secret(self.namespace, r["name"], r.get("optional", False))
                if r["key"] in data:
                    env[name] = data[r["key"]]
                elif not r.get("optional"):
                    raise ValueError(f"secret {r['name']} has no key {r['key']}")
            elif "resourceFieldRef" in ref:
                r = ref["resourceFieldRef"]
                res = spec.get("resources") or {}
                kind, _, what = r["resource"].partition(".")
                env[name] = str((res.get(kind) or {}).get(what, "0"))
        return env

    # -- service account --

    def _write_credentials(self) -> None:
        spec = self.pod["spec"]
        if spec.get("automountServiceAccountToken") is False:
            return
        sa = spec.get("serviceAccountName") or "default"
        token = self.sim.pod_token(self.namespace, sa, self.pod_name, self.uid)
        sa_dir = self.dir / "serviceaccount"
        sa_dir.mkdir(exist_ok=True)
        (sa_dir / "token").write_text(token)
        (sa_dir / "ca.crt").write_bytes(self.sim.ca_pem)
        (sa_dir / "namespace").write_text(self.namespace)
        server = self.sim.server
        if not self.host_network and self.sim.apiserver_service:
            host, port = self.sim.apiserver_service
            server = f"https://{host}:{port}"
        doc = kubeconfig_document(server, sa_dir / "ca.crt", user=f"system:serviceaccount:{self.namespace}:{sa}",
                                  token=token)
        doc["contexts"][0]["context"]["namespace"] = self.namespace
        self.kubeconfig_path = write_kubeconfig(self.dir / "kubeconfig", doc)

    # -- readiness probes --

    def _probe_all(self, now: float) -> None:
        for c in self.containers:
            probe = c.spec.get("readinessProbe")
            if not probe or not c.running() or now < c.next_probe:
                continue
            c.next_probe = now + probe.get("periodSeconds", 10)
            if self._probe(c, probe):
                c.probe_fail = 0
                c.probe_ok += 1
                if c.probe_ok >= probe.get("successThreshold", 1):
                    c.ready = True
            else:
                c.probe_ok = 0
                c.probe_fail += 1
                if c.probe_fail >= probe.get("failureThreshold", 3) or not c.ready:
                    c.ready = False

    def _port(self, c: ContainerRun, port) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for p in c.spec.get("ports") or []:
            if p.get("name") == port:
                return int(p["containerPort"])
        raise ValueError(f"container {c.name} has no port named {port}")

    def _probe(self, c: ContainerRun, probe: dict) -> bool:
        timeout = probe.get("timeoutSeconds", 1)
        try:
            if "httpGet" in probe:
                h = probe["httpGet"]
                host = h.get("host") or self.pod_ips[0]
                scheme = h.get("scheme", "HTTP").lower()
                url = f"{scheme}://{host}:{self._port(c, h['port'])}{h.get('path', '/')}"
                ctx = ssl._create_unverified_context() if scheme == "https" else None
                req = urllib.request.Request(url, headers={
                    x["name"]: x["value"] for x in h.get("httpHeaders") or []})
                with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
                    return 200 <= resp.status < 400
            if "tcpSocket" in probe:
                t = probe["tcpSocket"]
                with socket.create_connection(
                        (t.get("host") or self.pod_ips[0], self._port(c, t["port"])), timeout=timeout):
                    return True
            if "exec" in probe:
                argv = list(probe["exec"]["command"])
                if self.sandbox:
                    argv = ["nsenter", f"--net=/run/netns/{self.sandbox.netns}", "--"] + argv
                return subprocess.run(argv, env=self._env(c.spec), capture_output=True,
                                      timeout=timeout).returncode == 0
        except Exception:
            return False
        return True

    # -- status --

    def _condition(self, kind: str, ok: bool) -> dict:
        status = "True" if ok else "False"
        prev = self.transitions.get(kind)
        if prev is None or prev[0] != status:
            self.transitions[kind] = (status, now_iso())
        return {"type": kind, "status": status, "lastProbeTime": None,
                "lastTransitionTime": self.transitions[kind][1]}

    def _container_status(self, c: ContainerRun) -> dict:
        if c.running():
            state = {"running": {"startedAt": c.started_at}}
        elif c.terminated is not None:
            state = {"terminated": c.terminated}
        else:
            state = {"waiting": c.waiting or {"reason": "ContainerCreating"}}
        st = {
            "name": c.name, "image": c.spec.get("image", ""), "imageID": "",
            "containerID": f"nodesim://{self.uid}/{c.name}/{c.restarts}",
            "ready": c.ready and c.running(), "started": c.running(),
            "restartCount": c.restarts, "state": state, "lastState": {},
        }
        if c.last_terminated:
            st["lastState"] = {"terminated": c.last_terminated}
        return st

    def _post_status(self, phase: Optional[str] = None, message: Optional[str] = None) -> None:
        policy = self.pod["spec"].get("restartPolicy", "Always")
        cs = self.containers
        if phase is None:
            if cs and all(c.terminated is not None for c in cs) and policy != "Always":
                phase = "Succeeded" if all(c.terminated["exitCode"] == 0 for c in cs) else "Failed"
            elif any(c.started_at for c in cs):
                phase = "Running"
            else:
                phase = "Pending"
        ready = bool(cs) and all(c.ready and c.running() for c in cs)
        ips = self.pod_ips
        status: dict[str, Any] = {
            "phase": phase,
            "hostIP": self.node.ip_v4,
            "hostIPs": [{"ip": self.node.ip_v4}, {"ip": self.node.ip_v6}],
            "startTime": self.start_time,
            "conditions": [
                self._condition("PodReadyToStartContainers", bool(ips)),
                self._condition("Initialized", True),
                self._condition("ContainersReady", ready),
                self._condition("Ready", ready),
            ],
            "containerStatuses": [self._container_status(c) for c in cs],
        }
        if ips:
            status["podIP"] = ips[0]
            status["podIPs"] = [{"ip": ip} for ip in ips]
        if message:
            status["message"] = message
        body = json.dumps(status, sort_keys=True)
        if body == self._last_status:
            return
        try:
            self.sim.core.patch_namespaced_pod_status(
                self.pod_name, self.namespace, {"metadata": {"uid": self.uid}, "status": status},
                _content_type=STRATEGIC)
            self._last_status = body
        except Exception as e:
            if getattr(e, "status", None) == 404:
                self.gone.set()
            elif getattr(e, "status", None) == 409:
                self.gone.set()   # a pod of the same name but another uid: ours is gone
            else:
                log.warning("pod %s/%s: status update failed: %s", self.namespace, self.pod_name, e)

    def _finalize_delete(self) -> None:
        """What kubelet does after the containers stopped: delete with grace 0 (uid-checked)."""
        import kubernetes
        try:
            self.sim.core.delete_namespaced_pod(
                self.pod_name, self.namespace,
                body=kubernetes.client.V1DeleteOptions(
                    grace_period_seconds=0, preconditions=kubernetes.client.V1Preconditions(uid=self.uid)))
        except Exception as e:
            if getattr(e, "status", None) not in (404, 409):
                log.warning("pod %s/%s: final delete failed: %s", self.namespace, self.pod_name, e)


# ---- the simulator ------------------------------------------------------------------------

class NodeSimulator:
    """Plays kubelet for `nodes` against the cluster in `kubeconfig` (an admin kubeconfig).

        sim = NodeSimulator(cp.kubeconfig, nodes=["node-a", "node-b"]).start()
        ...
        sim.log_path("default", "my-pod", "main")   # the container's stdout+stderr
        sim.stop()

    Parameters:
      nodes: names, or {name: {label: value}} for extra labels per node.
      labels: labels for every node (on top of kubernetes.io/os=linux, kubernetes.io/hostname,
        kubernetes.io/arch, rtrace.dev/simulated=true).
      state_dir: where pod dirs (logs, kubeconfig, serviceaccount/) go; a temp dir by default.
      image_entrypoints: image -> command for containers that have no `command`.
      restart_backoff / max_restart_backoff: restart delays (kubelet: 10 s .. 300 s).
      delete_nodes: delete the Node objects on stop().
    """

    def __init__(self, kubeconfig, nodes=("node-a", "node-b"), *, labels: Optional[dict] = None,
                 state_dir=None, image_entrypoints: Optional[dict] = None,
                 restart_backoff: float = 1.0, max_restart_backoff: float = 30.0,
                 delete_nodes: bool = True, path: Optional[str] = None):
        import kubernetes

        self.kubeconfig = Path(kubeconfig)
        doc = yaml.safe_load(self.kubeconfig.read_text())
        cluster = doc["clusters"][0]["cluster"]
        self.server = cluster["server"]
        self.ca_pem = base64.b64decode(cluster["certificate-authority-data"])
        self.api = kubernetes.config.new_client_from_config(config_file=str(self.kubeconfig))
        self.api.configuration.connection_pool_maxsize = 32
        self.core = kubernetes.client.CoreV1Api(self.api)
        if isinstance(nodes, dict):
            node_labels = dict(nodes)
        else:
            node_labels = {n: {} for n in nodes}
        if len(node_labels) > 16:
            raise ValueError("at most 16 nodes per simulator")
        self._node_labels = node_labels
        self.common_labels = dict(labels or {})
        self._own_state = state_dir is None
        self.state_dir = Path(state_dir or tempfile.mkdtemp(prefix="rtrace-nodesim-"))
        self.image_entrypoints = dict(image_entrypoints or {})
        self.restart_backoff = restart_backoff
        self.max_restart_backoff = max_restart_backoff
        self.delete_nodes = delete_nodes
        # Pods find the project's console scripts (retransmit-agent, ...) like the simulator does.
        venv_bin = str(Path(sys.executable).parent)
        self.path = path or os.pathsep.join([venv_bin, os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")])
        self.nodes: list[SimNode] = []
        self.nodes_by_name: dict[str, SimNode] = {}
        self.network: Optional[PodNetwork] = None
        self.apiserver_service: Optional[tuple[str, int]] = None
        self.workers: dict[str, PodWorker] = {}
        self._workers_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._proxy: Optional[tuple] = None
        self._slot_fd: Optional[int] = None
        self._boot_id = str(uuid.uuid4())
        self._transitions: dict[tuple[str, str], tuple[str, str]] = {}
        self._started = False

    # -- lifecycle --

    def __enter__(self) -> "NodeSimulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "NodeSimulator":
        import atexit
        atexit.register(self.stop)
        self._started = True
        try:
            slot, self._slot_fd = acquire_slot("podnet")
            self.nodes = [SimNode(name, i, slot, {**self.common_labels, **extra})
                          for i, (name, extra) in enumerate(self._node_labels.items())]
            self.nodes_by_name = {n.name: n for n in self.nodes}
            self.network = PodNetwork(slot, self.nodes)
            self.network.setup()
            self._start_apiserver_proxy()
            for node in self.nodes:
                self._register(node)
            self._spawn(self._heartbeat, "nodesim-heartbeat")
            self._spawn(self._watch_pods, "nodesim-watch")
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, target, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        """End every pod process, remove namespaces, the bridge and (by default) the Nodes."""
        import atexit
        if not self._started:
            return
        self._started = False
        self._stop.set()
        with self._workers_lock:
            workers = list(self.workers.values())
        for w in workers:
            w.stop()
        for w in workers:
            w.join(15)
        for t in self._threads:
            t.join(15)
        if self._proxy:
            release_proxy(self._proxy)
            self._proxy = None
        if self.delete_nodes:
            for node in self.nodes:
                with contextlib.suppress(Exception):
                    self.core.delete_node(node.name, _request_timeout=5)
        if self.network:
            self.network.teardown()
        if self._slot_fd is not None:
            os.close(self._slot_fd)
            self._slot_fd = None
        with contextlib.suppress(Exception):
            self.api.close()
        if self._own_state and not os.environ.get("RTRACE_KEEP_CLUSTER"):
            shutil.rmtree(self.state_dir, ignore_errors=True)
        atexit.unregister(self.stop)

    # -- public helpers --

    def log_path(self, namespace: str, pod: str, container: Optional[str] = None) -> Path:
        """The log file of a container (the pod's first container by default); newest pod of
        that name when the pod was re-created."""
        dirs = sorted((self.state_dir / "pods").glob(f"{namespace}_{pod}_*"), key=lambda p: p.stat().st_mtime)
        if not dirs:
            raise FileNotFoundError(f"no pod {namespace}/{pod} ran on this simulator")
        if container is None:
            logs = sorted(dirs[-1].glob("*.log"))
            if not logs:
                raise FileNotFoundError(f"pod {namespace}/{pod} has no container log yet")
            return logs[0]
        return dirs[-1] / f"{container}.log"

    def pod_dir(self, namespace: str, pod: str) -> Path:
        dirs = sorted((self.state_dir / "pods").glob(f"{namespace}_{pod}_*"), key=lambda p: p.stat().st_mtime)
        if not dirs:
            raise FileNotFoundError(f"no pod {namespace}/{pod} ran on this simulator")
        return dirs[-1]

    def netns(self, namespace: str, pod: str) -> Optional[str]:
        """The network namespace name of a running pod (None for hostNetwork pods)."""
        with self._workers_lock:
            for w in self.workers.values():
                if (w.namespace, w.pod_name) == (namespace, pod) and w.sandbox:
                    return w.sandbox.netns
        return None

    def pids(self, namespace: str, pod: str) -> dict[str, int]:
        """Container name -> pid of its running process."""
        with self._workers_lock:
            for w in self.workers.values():
                if (w.namespace, w.pod_name) == (namespace, pod):
                    return {c.name: c.proc.pid for c in w.containers if c.running()}
        return {}

    def read_config_map(self, namespace: str, name: str, optional: bool = False) -> dict[str, str]:
        try:
            return self.core.read_namespaced_config_map(name, namespace).data or {}
        except Exception as e:
            if optional and getattr(e, "status", None) == 404:
                return {}
            raise

    def read_secret(self, namespace: str, name: str, optional: bool = False) -> dict[str, str]:
        try:
            data = self.core.read_namespaced_secret(name, namespace).data or {}
        except Exception as e:
            if optional and getattr(e, "status", None) == 404:
                return {}
            raise
        return {k: base64.b64decode(v).decode() for k, v in data.items()}

    def pod_token(self, namespace: str, service_account: str, pod: str, uid: str) -> str:
        """A TokenRequest bound to the pod, as kubelet asks for it."""
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"audiences": [SERVICE_ACCOUNT_ISSUER], "expirationSeconds": TOKEN_SECONDS,
                         "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod, "uid": uid}}}
        return self.core.create_namespaced_service_account_token(service_account, namespace, body).status.token

    # -- the apiserver's ClusterIP --

    def _start_apiserver_proxy(self) -> None:
        """Pods in their own netns cannot reach 127.0.0.1: proxy the `kubernetes` Service."""
        from urllib.parse import urlparse

        svc = None
        deadline = time.monotonic() + 30
        while svc is None:
            try:
                svc = self.core.read_namespaced_service("kubernetes", "default")
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        ip, port = svc.spec.cluster_ip, svc.spec.ports[0].port
        target = urlparse(self.server)
        self.network.add_local_address(ip)
        self._proxy = share_proxy(ip, port, target.hostname, target.port or 443)
        self.apiserver_service = (ip, port)

    # -- nodes --

    def _node_object(self, node: SimNode) -> dict:
        labels = {
            "kubernetes.io/hostname": node.name, "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64", "beta.kubernetes.io/os": "linux",
            "beta.kubernetes.io/arch": "amd64", "rtrace.dev/simulated": "true",
            **node.labels,
        }
        return {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node.name, "labels": labels},
            "spec": {"podCIDR": str(node.pod_cidr_v4),
                     "podCIDRs": [str(node.pod_cidr_v4), str(node.pod_cidr_v6)]},
            "status": self._node_status(node),
        }

    def _node_status(self, node: SimNode) -> dict:
        now = now_iso()
        resources = {"cpu": "8", "memory": "32Gi", "pods": "110", "ephemeral-storage": "100Gi"}

        def cond(kind: str, status: str, reason: str, message: str) -> dict:
            return {"type": kind, "status": status, "reason": reason, "message": message,
                    "lastHeartbeatTime": now, "lastTransitionTime": self._transition(node, kind, status)}
        return {
            "capacity": resources, "allocatable": resources,
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "simulated"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "simulated"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "simulated"),
                cond("Ready", "True", "KubeletReady", "node simulator is posting ready status"),
            ],
            "addresses": [{"type": "InternalIP", "address": node.ip_v4},
                          {"type": "InternalIP", "address": node.ip_v6},
                          {"type": "Hostname", "address": node.name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "machineID": uuid.uuid5(uuid.NAMESPACE_DNS, node.name).hex,
                "systemUUID": str(uuid.uuid5(uuid.NAMESPACE_DNS, node.name)),
                "bootID": self._boot_id, "kernelVersion": platform.release(),
                "osImage": "rtrace node simulator", "containerRuntimeVersion": "nodesim://0.1",
                "kubeletVersion": kubernetes_version(), "kubeProxyVersion": kubernetes_version(),
                "operatingSystem": "linux", "architecture": "amd64",
            },
        }

    def _transition(self, node: SimNode, kind: str, status: str) -> str:
        key = (node.name, kind)
        prev = self._transitions.get(key)
        if prev is None or prev[0] != status:
            self._transitions[key] = (status, now_iso())
        return self._transitions[key][1]

    def _register(self, node: SimNode) -> None:
        from kubernetes.client.rest import ApiException

        obj = self._node_object(node)
        try:
            self.core.create_node(obj)
        except ApiException as e:
            if e.status != 409:
                raise
            self.core.patch_node(node.name, {"metadata": {"labels": obj["metadata"]["labels"]}},
                                 _content_type=MERGE)
        self.core.patch_node_status(node.name, {"status": obj["status"]}, _content_type=MERGE)
        self._renew_lease(node)

    def _renew_lease(self, node: SimNode) -> None:
        import kubernetes
        from kubernetes.client.rest import ApiException

        coord = kubernetes.client.CoordinationV1Api(self.api)
        spec = {"holderIdentity": node.name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": now_micro()}
        try:
            coord.patch_namespaced_lease(node.name, "kube-node-lease", {"spec": spec}, _content_type=MERGE)
        except ApiException as e:
            if e.status != 404:
                raise
            coord.create_namespaced_lease("kube-node-lease", {
                "metadata": {"name": node.name, "ownerReferences": [{
                    "apiVersion": "v1", "kind": "Node", "name": node.name,
                    "uid": self.core.read_node(node.name).metadata.uid}]},
                "spec": spec})

    def _heartbeat(self) -> None:
        last_status = time.monotonic()
        while not self._stop.wait(LEASE_RENEW_SECONDS):
            for node in self.nodes:
                try:
                    self._renew_lease(node)
                    if time.monotonic() - last_status >= NODE_STATUS_SECONDS:
                        self.core.patch_node_status(node.name, {"status": self._node_status(node)},
                                                    _content_type=MERGE)
                except Exception as e:
                    log.warning("node %s: heartbeat failed: %s", node.name, e)
            if time.monotonic() - last_status >= NODE_STATUS_SECONDS:
                last_status = time.monotonic()

    # -- pods --

    def _watch_pods(self) -> None:
        import kubernetes

        backoff = 0.5
        while not self._stop.is_set():
            try:
                pods = self.api.sanitize_for_serialization(self.core.list_pod_for_all_namespaces())
                seen = set()
                for pod in pods["items"]:
                    seen.add(pod["metadata"]["uid"])
                    self._dispatch("MODIFIED", pod)
                with self._workers_lock:
                    vanished = [w for uid, w in self.workers.items() if uid not in seen]
                for w in vanished:
                    w.deleted()
                rv = pods["metadata"]["resourceVersion"]
                backoff = 0.5
                while not self._stop.is_set():
                    w = kubernetes.watch.Watch()
                    for ev in w.stream(self.core.list_pod_for_all_namespaces, resource_version=rv,
                                       timeout_seconds=5, allow_watch_bookmarks=True):
                        obj = ev["raw_object"]
                        if ev["type"] == "ERROR":   # e.g. 410 Gone: list again
                            raise RuntimeError(f"watch error: {obj.get('message')}")
                        rv = obj["metadata"].get("resourceVersion", rv)
                        if ev["type"] in ("ADDED", "MODIFIED", "DELETED"):
                            self._dispatch(ev["type"], obj)
                        if self._stop.is_set():
                            w.stop()
            except Exception as e:
                if self._stop.is_set():
                    return
                log.warning("pod watch: %s; re-listing in %.1fs", e, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 10)

    def _dispatch(self, kind: str, pod: dict) -> None:
        node = (pod.get("spec") or {}).get("nodeName")
        if node not in self.nodes_by_name:
            return
        uid = pod["metadata"]["uid"]
        with self._workers_lock:
            worker = self.workers.get(uid)
            if kind == "DELETED":
                if worker:
                    worker.deleted()
                return
            if worker is None:
                if pod.get("status", {}).get("phase") in ("Succeeded", "Failed") and not self._ours(pod):
                    return
                if pod["metadata"].get("deletionTimestamp"):
                    # Bound, never started here, already being deleted: just finish it.
                    threading.Thread(target=self._delete_unstarted, args=(pod,), daemon=True).start()
                    return
                worker = PodWorker(self, pod)
                self.workers[uid] = worker
                worker.start()
                return
        worker.update(pod)

    def _ours(self, pod: dict) -> bool:
        return pod["metadata"]["uid"] in self.workers

    def _delete_unstarted(self, pod: dict) -> None:
        import kubernetes
        with contextlib.suppress(Exception):
            self.core.delete_namespaced_pod(
                pod["metadata"]["name"], pod["metadata"]["namespace"],
                body=kubernetes.client.V1DeleteOptions(
                    grace_period_seconds=0,
                    preconditions=kubernetes.client.V1Preconditions(uid=pod["metadata"]["uid"])))

    def _worker_done(self, worker: PodWorker) -> None:
        with self._workers_lock:
            if self.workers.get(worker.uid) is worker and (worker.gone.is_set() or worker._deleting()):
                del self.workers[worker.uid]


# ---- command line -------------------------------------------------------------------------

def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.nodesim", description=__doc__.split("\n")[0])
    parser.add_argument("--kubeconfig", required=True, help="an admin kubeconfig")
    parser.add_argument("--nodes", default="node-a,node-b", help="comma-separated node names")
    parser.add_argument("--label", action="append", default=[], help="KEY=VALUE for every node")
    parser.add_argument("--state-dir", default=None, help="pod dirs and logs (default: a temp dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    labels = dict(kv.split("=", 1) for kv in args.label)
    sim = NodeSimulator(args.kubeconfig, [n for n in args.nodes.split(",") if n], labels=labels,
                        state_dir=args.state_dir)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    with sim:
        print(f"node simulator: nodes {', '.join(n.name for n in sim.nodes)}; pod logs under "
              f"{sim.state_dir / 'pods'}", flush=True)
        done.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
