"""A real node for the test control plane: kubelet + containerd + runc + a CNI bridge on this
host, so the chart's pods run as real containers (image, mounts, probes, securityContext,
resource limits) next to the node simulator's processes.

    with ControlPlane() as cp, RealNode(cp, images=["localhost/retransmit-operator:dev",
                                                "localhost/retransmit-agent:dev"]) as node:
        node.name            # the Node's name (NODE_NAME)
        node.pod_pids(uid)   # host pids of a pod's processes; node.netns_path(uid) for its netns
        node.container_cgroup(pod, "agent", "memory")   # a container's cgroup dir (v1 or v2)

What start() does (20-50 s when an image must be imported, about 1.5 s when they are unchanged;
see `timings`):
  - one real node per host: a lock in /run/rtrace-slots, fixed bridge and pod CIDRs;
    records the host state it may change (realnode_host.HostState) into its state dir;
  - a bridge (BRIDGE) holding the node IP (the pods' gateway) and the `kubernetes` Service's
    ClusterIP, which a proxy forwards to the API server on 127.0.0.1 while no kube-proxy runs
    (kubeproxy.KubeProxy with real_node_network(node) routes every Service, that one too);
  - a process holding a private mount namespace whose / is made rshared: containerd and
    kubelet run in it (nsenter), so the DaemonSet's HostToContainer mounts work and none of
    their mounts (overlays, netns, tmpfs volumes) shows on the host;
  - containerd (config version 2, own root/state/sockets under the state dir, cgroupfs,
    restrict_oom_score_adj, runtime binary: the test-only capability filter
    runc_capfilter.py, because this host's bounding set lacks CAP_SYS_RESOURCE);
  - the sandbox image (SANDBOX_IMAGE, made from the `pause` program make k8s-binaries builds)
    and the project's images (podman save; ctr import) in namespace k8s.io. containerd's
    root (images only) stays in the cache dir, so an unchanged image is not imported again;
  - kubelet (node client and serving certificates from the control plane's CA, webhook
    authentication and authorization, cgroupfs, image GC off), waits for the Node to be
    Ready and sets its podCIDRs.
stop() undoes it in this order: the Node tainted NoExecute and its pods deleted (kubelet stops
their sandboxes: CNI DEL), kubelet stopped, remaining containers killed and every container
removed, containerd and its shims stopped (by pid), the mount namespace ended, the Node
deleted, the bridge removed, sysctls restored, the kubepods cgroups and host paths it created
removed. clean_up_dead_node() does the host part for a node whose process was killed.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import io
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from .controlplane import (SLOT_DIR, ControlPlane, ControlPlaneError, binaries_dir, cache_dir, end_process,
                           free_port, kubeconfig_document, log_tail, start_process, wait_until, write_kubeconfig)
from .realnode_host import HostState, pids_in_kubepods, processes_matching, restore

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
NODE_NAME = "rtrace-real-node"
BRIDGE = "rtrnode0"
POD_CIDR_V4 = ipaddress.ip_network("198.19.250.0/24")
POD_CIDR_V6 = ipaddress.ip_network("fd00:0:250::/64")
NODE_IP = str(POD_CIDR_V4.network_address + 1)          # on the bridge; the pods' gateway
NODE_IP_V6 = str(POD_CIDR_V6.network_address + 1)
SANDBOX_IMAGE = "registry.k8s.io/pause:3.10.1"
K8S_NAMESPACE = "k8s.io"                                # containerd namespace of the CRI
LOCK = SLOT_DIR / "real-node.lock"
CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
CNI_BIN = "/usr/lib/cni"
TEARDOWN_TAINT = "rtrace.dev/real-node-teardown"


class RealNodeError(ControlPlaneError):
    """The real node could not start; the message says what to look at."""


def run(*argv: str, check: bool = True, timeout: float = 300, **kwargs: Any) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and done.returncode != 0:
        raise RealNodeError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()[-2000:]}")
    return done


def require_tools() -> None:
    missing = [p for p in (CONTAINERD, CTR, "/usr/sbin/runc", f"{CNI_BIN}/bridge", f"{CNI_BIN}/host-local",
                           f"{CNI_BIN}/loopback") if not os.access(p, os.X_OK)]
    if missing:
        raise RealNodeError(f"missing {', '.join(missing)}: run `make real-node-tools` "
                            "(apt: containerd runc containernetworking-plugins)")
    for b in ("kubelet", "pause"):
        if not os.access(binaries_dir() / b, os.X_OK):
            raise RealNodeError(f"{binaries_dir() / b} missing: run `make k8s-binaries`")


# ---- images -----------------------------------------------------------------------------

def sandbox_image_archive(pause: Path, out: Path, ref: str = SANDBOX_IMAGE) -> Path:
    """An OCI image layout tar holding one layer with `pause` as /pause (its entrypoint)."""
    def blob(data: bytes) -> tuple[str, bytes]:
        return "sha256:" + hashlib.sha256(data).hexdigest(), data

    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo("pause")
        info.size, info.mode, info.mtime = pause.stat().st_size, 0o755, 0
        with open(pause, "rb") as f:
            t.addfile(info, f)
    layer_digest, layer = blob(layer_buf.getvalue())
    config_digest, config = blob(json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/pause"], "User": "65535:65535"},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }).encode())
    manifest_digest, manifest = blob(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest,
                    "size": len(layer)}],
    }).encode())
    index = json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
        "size": len(manifest),
        "annotations": {"io.containerd.image.name": ref, "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[1]},
    }]}).encode()
    with tarfile.open(out, "w") as t:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add("index.json", index)
        for digest, data in ((layer_digest, layer), (config_digest, config), (manifest_digest, manifest)):
            add(f"blobs/sha256/{digest.split(':')[1]}", data)
    return out


def podman_image_id(image: str) -> str:
    inspect = run("podman", "image", "inspect", "--format", "{{.Id}}", image, check=False)
    if inspect.returncode != 0:
        raise RealNodeError(f"image {image} not found in podman: run `make image-build` ({inspect.stderr.strip()})")
    return inspect.stdout.strip()


def podman_archive(image: str, out: Path) -> Path:
    """`podman save` of `image` (docker-archive, which `ctr images import` reads)."""
    run("podman", "save", "--format", "docker-archive", "-o", str(out), image, timeout=600)
    return out


# ---- the node ---------------------------------------------------------------------------

class RealNode:
    def __init__(self, cp: ControlPlane, *, images: Sequence[str] = (), state_dir: Optional[Path] = None,
                 name: str = NODE_NAME, start_timeout: float = 180.0):
        self.cp, self.images, self.name, self.start_timeout = cp, tuple(images), name, start_timeout
        self._own_state = state_dir is None
        self.state = Path(state_dir) if state_dir else Path(tempfile.mkdtemp(prefix="rtrace-realnode-"))
        self.store = cache_dir() / "real-node-containerd"     # images only, see _open_store
        self.timings: dict[str, float] = {}
        self.before: Optional[HostState] = None
        self._lock_fd: Optional[int] = None
        self._holder: Optional[subprocess.Popen] = None
        self._containerd: Optional[subprocess.Popen] = None
        self._kubelet: Optional[subprocess.Popen] = None
        self._proxy_key: Optional[tuple] = None
        self._bridge_made = False

    # -- paths --

    @property
    def withheld_capabilities_file(self) -> Path:
        """While it exists, containers started without CAP_SYS_ADMIN do not get the
        capabilities it names (runc_capfilter.py): a runtime that does not grant them."""
        return self.state / "capfilter-withhold"

    @contextlib.contextmanager
    def withhold_capabilities(self, *names: str):
        """Within the block, new unprivileged containers lack `names` (e.g. "CAP_PERFMON")."""
        self.withheld_capabilities_file.write_text("".join(f"{name}\n" for name in names))
        try:
            yield
        finally:
            self.withheld_capabilities_file.unlink(missing_ok=True)

    @property
    def socket(self) -> Path:
        return self.state / "containerd.sock"

    def log_file(self, component: str) -> Path:
        return self.state / f"{component}.log"

    def ctr(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        return run(CTR, "--address", str(self.socket), "--namespace", K8S_NAMESPACE, *args,
                   check=check, timeout=timeout)

    # -- lifecycle --

    def __enter__(self) -> "RealNode":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> "RealNode":
        require_tools()
        self.state.mkdir(parents=True, exist_ok=True)
        self._lock_fd = fd = acquire_node_lock()
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {self.state}\n".encode())
        atexit.register(self.stop)
        started = time.monotonic()
        try:
            self._cleanup_stale()
            self.before = HostState.capture(self.state, re.compile(f"^{BRIDGE}$"))
            self.before.save(self.state / "host-before.json")
            self._start()
        except BaseException:
            self.stop()
            raise
        self.timings["total"] = time.monotonic() - started
        log.info("real node %s up in %.1fs (%s)", self.name, self.timings["total"],
                 ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items()))
        return self

    def _step(self, name: str, started: float) -> float:
        now = time.monotonic()
        self.timings[name] = now - started
        return now

    def _start(self) -> None:
        t = time.monotonic()
        bins = binaries_dir()
        self._write_certificates()
        self._make_bridge()
        self._hold_mount_namespace()
        t = self._step("network+namespace", t)
        self._start_containerd()
        t = self._step("containerd", t)
        try:
            self._ensure_images(bins / "pause")
        except RealNodeError as e:
            # The cached store can disagree with itself after a run that died mid-import
            # ("parent snapshot ... does not exist"): start from an empty store once.
            log.warning("image import into the cached store failed (%s): wiping %s and importing again", e, self.store)
            self._wipe_store()
            self._ensure_images(bins / "pause")
        t = self._step("images", t)
        self._start_kubelet(bins / "kubelet")
        self._step("kubelet-ready", t)

    # -- pieces --

    def _write_certificates(self) -> None:
        ca = self.cp.ca
        if ca is None:
            raise RealNodeError("the control plane has no CA object (started by another process?)")
        pki = self.state / "pki"
        pki.mkdir(exist_ok=True)
        ca.dir, saved = pki, ca.dir
        try:
            client = ca.issue("kubelet-client", f"system:node:{self.name}", organizations=("system:nodes",))
            self.serving = ca.issue("kubelet-serving", self.name, dns=(self.name,), ips=(NODE_IP,))
        finally:
            ca.dir = saved
        self.kubeconfig = write_kubeconfig(self.state / "kubelet.kubeconfig", kubeconfig_document(
            self.cp.server, self.cp.ca_file, user=f"system:node:{self.name}", client=client))

    def _make_bridge(self) -> None:
        run("ip", "link", "add", BRIDGE, "type", "bridge")
        self._bridge_made = True
        run("ip", "addr", "add", f"{NODE_IP}/{POD_CIDR_V4.prefixlen}", "dev", BRIDGE)
        run("ip", "-6", "addr", "add", f"{NODE_IP_V6}/{POD_CIDR_V6.prefixlen}", "dev", BRIDGE, "nodad")
        run("ip", "link", "set", BRIDGE, "up")
        # Pods reach the API server through the `kubernetes` Service's ClusterIP, made an
        # address of this host here and proxied to 127.0.0.1 (shared with a node simulator
        # of this process, which does the same).
        from .nodesim import share_proxy

        service_ip = str(next(ipaddress.ip_network(self.cp.service_cidr).hosts()))
        run("ip", "addr", "add", f"{service_ip}/32", "dev", BRIDGE)
        api_port = int(self.cp.server.rsplit(":", 1)[1])
        self._proxy_key = share_proxy(service_ip, 443, "127.0.0.1", api_port)

    def _hold_mount_namespace(self) -> None:
        ready = self.state / "mountns.ready"
        self._holder = start_process(
            ["unshare", "--mount", "--", "sh", "-c",
             f"mount --make-rshared / && touch {ready} && exec sleep infinity"],
            self.log_file("mountns"))
        wait_until(lambda: ready.exists() or self._holder.poll() is not None, "the mount namespace", timeout=30)
        if self._holder.poll() is not None:
            raise RealNodeError(f"mount namespace holder exited: {log_tail(self.log_file('mountns'))}")

    def _in_namespace(self, argv: list[str]) -> list[str]:
        return ["nsenter", f"--mount=/proc/{self._holder.pid}/ns/mnt", "--", *argv]

    def _start_containerd(self) -> None:
        s = self.state
        self._open_store()
        (s / "net.d").mkdir(exist_ok=True)
        (s / "net.d" / "10-rtrace.conflist").write_text(json.dumps(self._cni_config(), indent=1))
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        config = f"""version = 2
root = "{self.store}"
state = "{s / 'containerd' / 'state'}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{s / 'containerd' / 'opt'}"
[{cri}]
  sandbox_image = "{SANDBOX_IMAGE}"
  disable_apparmor = true
  # No CAP_SYS_RESOURCE on this host: runc cannot lower oom_score_adj below its own.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        BinaryName = "{HERE / 'runc_capfilter.py'}"
        Root = "{s / 'runc'}"
        SystemdCgroup = false
  [{cri}.cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{s / 'net.d'}"
    max_conf_num = 1
"""
        (s / "containerd.toml").write_text(config)
        # Its shims, and so runc_capfilter.py, inherit the environment: the file a test writes
        # to withhold capabilities from unprivileged containers (withhold_capabilities).
        self._containerd = start_process(
            self._in_namespace([CONTAINERD, "--config", str(s / "containerd.toml")]), self.log_file("containerd"),
            env={**os.environ, "RTRACE_CAPFILTER_WITHHOLD": str(self.withheld_capabilities_file)})

        def answers() -> bool:
            if self._containerd.poll() is not None:
                raise RealNodeError(f"containerd exited: {log_tail(self.log_file('containerd'))}")
            return self.socket.exists() and self.ctr("version", check=False, timeout=10).returncode == 0
        wait_until(answers, "containerd to answer", timeout=60)
        if self.ctr("containers", "ls", "-q").stdout.split():
            log.warning("containers left in %s by an earlier run: wiping the image store", self.store)
            self._wipe_store()

    def _cni_config(self) -> dict:
        # The bridge exists already with the gateway addresses: isGateway stays false, so the
        # plugin neither adds addresses nor turns on IP forwarding; the routes say where to go.
        return {"cniVersion": "0.4.0", "name": "rtrace-real-node", "plugins": [
            {"type": "bridge", "bridge": BRIDGE, "isGateway": False, "ipMasq": False, "hairpinMode": True,
             "ipam": {"type": "host-local", "dataDir": str(self.state / "cni-ipam"),
                      "ranges": [[{"subnet": str(POD_CIDR_V4), "gateway": NODE_IP}],
                                 [{"subnet": str(POD_CIDR_V6), "gateway": NODE_IP_V6}]],
                      "routes": [{"dst": "0.0.0.0/0", "gw": NODE_IP}, {"dst": "::/0", "gw": NODE_IP_V6}]}},
            {"type": "loopback"},
        ]}

    def _open_store(self) -> None:
        """containerd's root, kept in the cache dir between runs so an unchanged image is not
        imported again (20-40 s for the project image). Only images live on: teardown removes
        every container, and this drops the CRI's and the runtime's per-container folders. A
        store with containers left in it (a run that died) is wiped and filled again."""
        self.store.mkdir(parents=True, exist_ok=True)
        for folder in ("io.containerd.grpc.v1.cri", "io.containerd.runtime.v2.task"):
            shutil.rmtree(self.store / folder, ignore_errors=True)

    def _wipe_store(self) -> None:
        """Stop containerd, empty its cached root, start it again."""
        end_process(self._containerd, grace=15)
        shutil.rmtree(self.store)
        self._start_containerd()

    def _ensure_images(self, pause: Path) -> None:
        self._ensure_image(SANDBOX_IMAGE, hashlib.sha256(pause.read_bytes()).hexdigest(),
                           lambda: sandbox_image_archive(pause, self.state / "pause-oci.tar"))
        for image in self.images:
            self._ensure_image(image, podman_image_id(image),
                               lambda image=image: podman_archive(image, self.state / "image.tar"))
        self._prune_images()

    def _imported(self) -> dict[str, str]:
        try:
            return json.loads((self.store / "imported.json").read_text())
        except (OSError, ValueError):
            return {}

    def _ensure_image(self, ref: str, version: str, archive) -> None:
        """Import `ref` unless the store holds it at `version` already."""
        present = self.ctr("images", "ls", "-q", f"name=={ref}", check=False).stdout.split()
        if present and self._imported().get(ref) == version:
            return
        started = time.monotonic()
        path = archive()
        self.timings[f"archive {ref}"] = time.monotonic() - started
        started = time.monotonic()
        self.ctr("images", "import", "--snapshotter", "overlayfs", str(path), timeout=600)
        self.timings[f"import {ref}"] = time.monotonic() - started
        path.unlink()
        imported = {**self._imported(), ref: version}
        (self.store / "imported.json").write_text(json.dumps(imported, indent=1))

    def _prune_images(self) -> None:
        """Drop image references to older versions (containerd's GC then frees their layers)."""
        rows = [line.split() for line in self.ctr("images", "ls").stdout.splitlines()[1:] if line.strip()]
        wanted = {SANDBOX_IMAGE, *self.images}
        keep = {row[2] for row in rows if row[0] in wanted}
        for row in rows:
            if row[0] not in wanted and row[2] not in keep:
                self.ctr("images", "rm", row[0], check=False)

    def _start_kubelet(self, kubelet: Path) -> None:
        s = self.state
        (s / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        port, healthz = free_port(), free_port()
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "address": NODE_IP, "port": port, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": healthz,
            "cgroupDriver": "cgroupfs", "failSwapOn": False, "failCgroupV1": False,
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "tlsCertFile": str(self.serving.cert), "tlsPrivateKeyFile": str(self.serving.key),
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(self.cp.ca_file)}},
            "authorization": {"mode": "Webhook"},
            "resolvConf": str(s / "resolv.conf"),
            "podLogsDir": str(s / "pod-logs"),
            "volumePluginDir": str(s / "volume-plugins"),
            "makeIPTablesUtilChains": False,
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "5%", "imagefs.available": "5%"},
            # Nothing can be pulled here: never collect the imported images.
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False,
            "registerNode": True,
        }
        (s / "kubelet.yaml").write_text(yaml.safe_dump(config))
        self._kubelet = start_process(self._in_namespace([
            str(kubelet), f"--config={s / 'kubelet.yaml'}", f"--kubeconfig={self.kubeconfig}",
            f"--root-dir={s / 'kubelet'}", f"--cert-dir={s / 'kubelet-pki'}",
            f"--hostname-override={self.name}", f"--node-ip={NODE_IP}", "--v=1",
        ]), self.log_file("kubelet"))

        import kubernetes

        with self.cp.api_client() as api:
            core = kubernetes.client.CoreV1Api(api)

            def ready():
                if self._kubelet.poll() is not None:
                    raise RealNodeError(f"kubelet exited: {log_tail(self.log_file('kubelet'))}")
                node = core.read_node(self.name)
                return any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])
            try:
                wait_until(ready, f"node {self.name} Ready", timeout=self.start_timeout)
            except TimeoutError as e:
                raise RealNodeError(f"{e}\n--- kubelet.log\n{log_tail(self.log_file('kubelet'), 30)}") from None
            # kubelet's own podCIDR setting applies to standalone kubelets only.
            core.patch_node(self.name, {"spec": {"podCIDR": str(POD_CIDR_V4),
                                                 "podCIDRs": [str(POD_CIDR_V4), str(POD_CIDR_V6)]}})

    # -- pods on this node --

    def pod_pids(self, uid: str) -> list[int]:
        """Host pids of a pod's processes (sandbox and containers), from the kubepods cgroups."""
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if f"/pod{uid}/" in (entry / "cgroup").read_text():
                        pids.append(int(entry.name))
                except OSError:
                    pass
        return sorted(pids)

    def netns_path(self, uid: str) -> str:
        """/proc/<pid>/ns/net of the pod's sandbox (its oldest process)."""
        pids = self.pod_pids(uid)
        if not pids:
            raise LookupError(f"pod {uid} has no process on {self.name}")
        return f"/proc/{pids[0]}/ns/net"

    def container_cgroup(self, pod: dict, container: str, controller: str = "memory") -> Path:
        """The cgroup directory of a running container (pod: the Pod as JSON): the
        `controller` hierarchy's on cgroup v1, the one unified directory on v2."""
        status = next(c for c in pod["status"]["containerStatuses"] if c["name"] == container)
        cid = status["containerID"].split("://", 1)[1]
        v1 = Path("/sys/fs/cgroup") / controller
        root = (v1 if v1.is_dir() else Path("/sys/fs/cgroup")) / "kubepods"
        found = [Path(d) for d, dirs, _ in os.walk(root) if Path(d).name == cid]
        if not found:
            raise LookupError(f"no {controller} cgroup for container {container} ({cid}) under {root}")
        return found[0]

    @staticmethod
    def memory_peak_and_limit(cgroup: Path) -> tuple[int, int]:
        """A container's peak memory and its limit in bytes, from its memory cgroup (v1 or v2)."""
        if (cgroup / "memory.max_usage_in_bytes").exists():
            return (int((cgroup / "memory.max_usage_in_bytes").read_text()),
                    int((cgroup / "memory.limit_in_bytes").read_text()))
        limit = (cgroup / "memory.max").read_text().strip()
        return int((cgroup / "memory.peak").read_text()), (-1 if limit == "max" else int(limit))

    # -- teardown --

    def stop(self) -> None:
        """Undo everything start() did, in order; safe to call twice and after a failed start."""
        if self._lock_fd is None:
            return
        problems: list[str] = []

        def step(what: str, fn) -> None:
            try:
                fn()
            except Exception as e:   # go on: later steps must still run
                problems.append(f"{what}: {e}")
                log.warning("real node teardown: %s: %s", what, e)

        if self._kubelet is not None and self._kubelet.poll() is None:
            step("delete the node's pods", self._delete_pods)
        if self._kubelet is not None:
            step("stop kubelet", lambda: end_process(self._kubelet, grace=15))
        if self._containerd is not None and self._containerd.poll() is None:
            step("kill remaining containers", self._kill_containers)
        if self._containerd is not None:
            step("stop containerd", lambda: end_process(self._containerd, grace=15))
        step("stop shims", self._kill_shims)
        step("kill processes left in kubepods cgroups", self._kill_kubepods)
        if self._holder is not None:
            step("end the mount namespace", lambda: end_process(self._holder, grace=5))
        if self._containerd is not None:
            step("drop per-container folders from the store", self._open_store)
        step("delete the Node", self._delete_node)
        if self._proxy_key is not None:
            from .nodesim import release_proxy

            step("release the API proxy", lambda: release_proxy(self._proxy_key))
            self._proxy_key = None
        if self._bridge_made:
            step("delete the bridge", lambda: run("ip", "link", "del", BRIDGE))
            self._bridge_made = False
        if self.before is not None:
            step("restore the host", self._restore_host)
        self._kubelet = self._containerd = self._holder = None
        if self._own_state and not os.environ.get("RTRACE_KEEP_CLUSTER"):
            shutil.rmtree(self.state, ignore_errors=True)
        os.close(self._lock_fd)
        self._lock_fd = None
        atexit.unregister(self.stop)
        if problems:
            log.error("real node teardown had problems: %s", "; ".join(problems))

    def _restore_host(self) -> None:
        restore(self.before, log=log.info)
        (self.state / "host-before.json").unlink(missing_ok=True)   # nothing left to undo

    def _delete_pods(self) -> None:
        import kubernetes

        with self.cp.api_client() as api:
            core = kubernetes.client.CoreV1Api(api)
            # Controllers would put deleted pods back (a DaemonSet's, a Deployment's): a
            # NoExecute taint keeps them off (the DaemonSet controller removes its pods too).
            core.patch_node(self.name, {"spec": {"unschedulable": True, "taints": [
                {"key": TEARDOWN_TAINT, "value": "", "effect": "NoExecute"}]}})
            selector = f"spec.nodeName={self.name}"

            def gone() -> bool:
                pods = core.list_pod_for_all_namespaces(field_selector=selector).items
                for pod in pods:
                    if pod.metadata.deletion_timestamp is None:
                        with contextlib.suppress(kubernetes.client.ApiException):
                            core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace,
                                                       grace_period_seconds=1)
                return not pods
            # kubelet confirms each deletion after stopping the pod's containers and sandbox.
            wait_until(gone, f"pods on {self.name} gone", timeout=90, interval=1.0)

    def _kill_containers(self) -> None:
        """Every container's task killed, then every container (sandboxes too) removed, so
        only images stay in the store."""
        tasks = self.ctr("tasks", "ls", "-q", check=False).stdout.split()
        for task in tasks:
            self.ctr("tasks", "kill", "--signal", "SIGKILL", task, check=False)
        for task in tasks:
            self.ctr("tasks", "delete", "--force", task, check=False)
        for container in self.ctr("containers", "ls", "-q", check=False).stdout.split():
            self.ctr("containers", "delete", container, check=False)

    def _shim_pids(self) -> list[int]:
        return [int(line.split()[0]) for line in processes_matching(("containerd-shim",))
                if str(self.socket) in line or str(self.state) in line]

    def _kill_shims(self) -> None:
        for pid in self._shim_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not self._shim_pids(), "containerd shims gone", timeout=30)

    def _kill_kubepods(self) -> None:
        before = set()
        if self.before is not None:
            before = {int(p.split()[0]) for p in self.before.processes if "kubepods" in p}
        for pid in pids_in_kubepods():
            if pid not in before:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not set(pids_in_kubepods()) - before, "processes in kubepods cgroups gone", timeout=30)

    def _delete_node(self) -> None:
        import kubernetes

        with self.cp.api_client() as api:
            try:
                kubernetes.client.CoreV1Api(api).delete_node(self.name)
            except kubernetes.client.ApiException as e:
                if e.status != 404:
                    raise

    def _cleanup_stale(self) -> None:
        clean_up_dead_node(self.state)


def clean_up_dead_node(*state_dirs: Path) -> None:
    """Undo what a real node that died without its teardown (SIGKILL) left: its containers'
    processes and shims, its bridge, and the host changes recorded in host-before.json in
    `state_dirs` or in temp state dirs. Call it holding LOCK (no live real node then)."""
    if run("ip", "link", "show", BRIDGE, check=False).returncode == 0:
        log.warning("removing bridge %s left by an earlier real node", BRIDGE)
        run("ip", "link", "del", BRIDGE)
    leftovers = [int(p.split()[0]) for p in processes_matching(("containerd-shim",))] + pids_in_kubepods()
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not processes_matching(("containerd-shim",)) and not pids_in_kubepods(),
               "processes of a dead real node gone", timeout=30)
    saved_files = [Path(d) / "host-before.json" for d in state_dirs]
    saved_files += Path(tempfile.gettempdir()).glob("rtrace-realnode-*/host-before.json")
    for saved in saved_files:
        if saved.exists():
            log.warning("restoring the host as recorded in %s by an earlier real node", saved)
            restore(HostState.load(saved), log=log.info)
            if saved.parent.name.startswith("rtrace-realnode-"):
                shutil.rmtree(saved.parent, ignore_errors=True)
            else:       # a state dir given again (make cluster-up): empty it
                for child in saved.parent.iterdir():
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def acquire_node_lock() -> int:
    """An fd holding LOCK (one real node per host: its paths, cgroups and bridge are fixed);
    RealNodeError when a live real node holds it."""
    SLOT_DIR.mkdir(parents=True, exist_ok=True)
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RealNodeError(f"another real node runs on this host (lock {LOCK} held by "
                            f"{Path(LOCK).read_text().strip()}); one per host") from None
    return fd
