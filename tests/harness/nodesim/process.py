"""The node simulator's pod worker: one thread per bound pod runs its containers as local
processes (init containers first, restarts with a capped backoff, readiness probes), gives
them their service account's credentials, posts the pod's status and, on deletion, ends the
processes and removes the pod object as kubelet does."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ..controlplane import end_process, kubeconfig_document, start_process, write_kubeconfig
from .network import PodSandbox
from .podspec import PodContext, container_command, container_env, container_port, granted_capabilities, with_capabilities

if TYPE_CHECKING:
    from .node import NodeSimulator

log = logging.getLogger("rtrace.nodesim")

STRATEGIC = "application/strategic-merge-patch+json"    # lists merged by key (pod conditions)


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def terminated_state(code: int, started_at: Optional[str]) -> dict:
    """A containerStatus `terminated` state for a process's exit code (a signal N is 128+N)."""
    return {"exitCode": code if code >= 0 else 128 - code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": started_at, "finishedAt": now_iso()}


def in_sandbox(argv: list[str], sandbox: Optional[PodSandbox]) -> list[str]:
    """argv run inside the pod's network namespace (as is for a hostNetwork pod)."""
    if sandbox is None:
        return argv
    return ["nsenter", f"--net=/run/netns/{sandbox.netns}", "--"] + argv


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
            if self.sim.cgroups is not None:
                self.sim.cgroups.remove_pod(self.node.name, self.pod)
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
            c.last_terminated = terminated_state(code, c.started_at)
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
        granted = granted_capabilities(c.spec, self.sim.withheld_capabilities.get(self.node.name, ()))
        argv = in_sandbox(with_capabilities(argv, granted), self.sandbox)
        if self.sim.cgroups is not None:   # in the container's kubepods cgroup, as kubelet would
            argv = self.sim.cgroups.exec_prefix(self.sim.cgroups.container_dir(self.node.name, self.pod, c.name)) + argv
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
                c.terminated = terminated_state(c.proc.returncode, c.started_at)
                c.proc = None
                c.ready = False

    def _command(self, spec: dict) -> tuple[list[str], dict[str, str], str]:
        env = self._env(spec)
        argv, cwd = container_command(spec, env, self.sim.image_entrypoints, str(self.dir))
        return argv, env, cwd

    def _env(self, spec: dict) -> dict[str, str]:
        return container_env(spec, self._context(spec))

    def _context(self, spec: dict) -> PodContext:
        return PodContext(
            pod=self.pod, node_name=self.node.name, pod_ips=self.pod_ips,
            host_ips=[self.node.ip_v4, self.node.ip_v6],
            path=self.sim.container_path(spec), home=os.environ.get("HOME", "/root"),
            apiserver_service=self.sim.apiserver_service, kubeconfig=self.kubeconfig_path,
            config_maps=lambda name, optional: self.sim.read_config_map(self.namespace, name, optional),
            secrets=lambda name, optional: self.sim.read_secret(self.namespace, name, optional))

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
        return container_port(c.spec, port)

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
                argv = in_sandbox(list(probe["exec"]["command"]), self.sandbox)
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
