"""The node simulator's node loop: registers the simulated Nodes and keeps them Ready
(Lease and status heartbeats), watches the pods bound to them and hands each to a pod
worker; set-up and tear-down of the pod network and the apiserver proxy."""

from __future__ import annotations

import base64
import contextlib
import datetime
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

import yaml

from ..controlplane import SERVICE_ACCOUNT_ISSUER, acquire_slot
from .cgroups import SimCgroups
from .network import PodNetwork, SimNode, release_proxy, share_proxy
from .podspec import container_path
from .process import PodWorker, now_iso

log = logging.getLogger("rtrace.nodesim")

LEASE_SECONDS = 40
LEASE_RENEW_SECONDS = 10
NODE_STATUS_SECONDS = 30
# kubelet asks for 3607 s: the apiserver then extends a pod-bound token to a year
# (--service-account-extend-token-expiration), so a long-running agent never needs a refresh.
TOKEN_SECONDS = 3607
MERGE = "application/merge-patch+json"                  # lists replaced whole


def now_micro() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


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
        # node -> capabilities its "runtime" does not grant unprivileged containers (a test
        # sets it, e.g. {"node-b": {"PERFMON"}}; containers started afterwards see it).
        self.withheld_capabilities: dict[str, set[str]] = {}
        self.restart_backoff = restart_backoff
        self.max_restart_backoff = max_restart_backoff
        self.delete_nodes = delete_nodes
        # Pods find the project's console scripts (retransmit-agent, ...) like the simulator does.
        venv_bin = str(Path(sys.executable).parent)
        self.path = path or os.pathsep.join([venv_bin, os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")])
        # image -> a folder of console scripts put first on such containers' $PATH (a test
        # sets it, e.g. an older release's build for that release's image; containers started
        # afterwards see it).
        self.image_bins: dict[str, str] = {}
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
        self.kubelet_version = ""       # the API server's: a kubelet of the cluster's own release
        self.cgroups: Optional[SimCgroups] = None   # pods' kubepods cgroups (None: no cgroup v2 here)

    # -- lifecycle --

    def __enter__(self) -> "NodeSimulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "NodeSimulator":
        import atexit

        import kubernetes
        atexit.register(self.stop)
        self._started = True
        try:
            self.kubelet_version = kubernetes.client.VersionApi(self.api).get_code().git_version
            slot, self._slot_fd = acquire_slot("podnet")
            self.nodes = [SimNode(name, i, slot, {**self.common_labels, **extra})
                          for i, (name, extra) in enumerate(self._node_labels.items())]
            self.nodes_by_name = {n.name: n for n in self.nodes}
            self.network = PodNetwork(slot, self.nodes)
            self.network.setup()
            self.cgroups = SimCgroups.create()
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
        if self.cgroups:
            self.cgroups.remove()
        if self._slot_fd is not None:
            os.close(self._slot_fd)
            self._slot_fd = None
        with contextlib.suppress(Exception):
            self.api.close()
        if self._own_state and not os.environ.get("RTRACE_KEEP_CLUSTER"):
            shutil.rmtree(self.state_dir, ignore_errors=True)
        atexit.unregister(self.stop)

    # -- nodes added and removed while running --

    def add_node(self, name: str, labels: Optional[dict] = None) -> SimNode:
        """Register one more node on the running simulator, with the next free address
        slot; its pods share the bridge with the others' (a test that needs a third node
        adds it rather than changing every test's cluster)."""
        if name in self.nodes_by_name:
            raise ValueError(f"node {name} is simulated already")
        index = next(i for i in range(17) if all(n.index != i for n in self.nodes))
        if index >= 16:
            raise ValueError("at most 16 nodes per simulator")
        node = SimNode(name, index, self.network.slot, {**self.common_labels, **(labels or {})})
        self.network.add_node(node)
        # New containers, not mutated ones: the heartbeat and the pod watch iterate them.
        self.nodes = [*self.nodes, node]
        self.nodes_by_name = {**self.nodes_by_name, name: node}
        self._register(node)
        return node

    def remove_node(self, name: str) -> None:
        """Stop simulating `name`: its pods' processes end, its Node object is deleted (the
        API server's garbage collector takes its Lease) and its addresses leave the bridge."""
        node = self.nodes_by_name[name]
        self.nodes_by_name = {k: v for k, v in self.nodes_by_name.items() if k != name}
        self.nodes = [n for n in self.nodes if n.name != name]
        with self._workers_lock:
            workers = [w for w in self.workers.values() if w.node is node]
        for w in workers:
            w.stop()
        for w in workers:
            w.join(15)
        # What the pod garbage collector would do for a vanished node, at once: no pod of the
        # next test waits on it.
        with contextlib.suppress(Exception):
            for pod in self.core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={name}").items:
                self._delete_unstarted(self.api.sanitize_for_serialization(pod))
        with contextlib.suppress(Exception):
            self.core.delete_node(name, _request_timeout=5)
        self.network.remove_node(node)

    # -- public helpers --

    def container_path(self, spec: dict) -> str:
        """$PATH of a container: `image_bins[its image]` first, then the simulator's own."""
        return container_path(spec, self.path, self.image_bins)

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

    def container_cgroup(self, namespace: str, pod: str, container: str) -> Path:
        """The cgroup v2 directory a running pod's container runs in (a process that joins it
        is "in" the container, as after kubectl exec); LookupError when there is none."""
        with self._workers_lock:
            worker = next((w for w in self.workers.values() if (w.namespace, w.pod_name) == (namespace, pod)), None)
        if worker is None or self.cgroups is None:
            raise LookupError(f"pod {namespace}/{pod} has no cgroup on this simulator (no cgroup v2, or not running)")
        return self.cgroups.container_dir(worker.node.name, worker.pod, container)

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
                "kubeletVersion": self.kubelet_version, "kubeProxyVersion": self.kubelet_version,
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

