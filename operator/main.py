"""`retransmit-operator`: run the operator (kopf, cluster-wide), or embed it in a thread with
`EmbeddedOperator`. Replicas elect one leader on a Lease (leader.py): the others stand by,
serving /healthz (alive) and /readyz (not ready) until they lead. kopf itself runs
standalone (no peering CRD): the election already makes it the only active one.

    retransmit-operator [--kubeconfig PATH] [--namespace NS] [--metrics-port N]

Configuration comes from the environment (retransmit_operator.settings); flags win.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
import threading
import uuid
from typing import Callable, Optional, Sequence

import kopf
from kubernetes.config import ConfigException

from .handlers import kopf_settings, register_handlers
from .heap import Heap
from .kube import KubeApi, client_configuration
from .leader import LeaderElection
from .metrics import OperatorMetrics
from .reconciler import Reconciler
from .settings import Settings, SettingsError

log = logging.getLogger("retransmit_operator")


def operator_identity() -> str:
    """Who this operator process is, for kopf: the pod's name (its hostname) and pid.

    kopf would otherwise derive it from getpass.getuser(), which raises for a uid without a
    passwd entry: containerd and CRI-O add none for the image's user, and OpenShift's
    restricted SCC runs the pod as an arbitrary uid. The operator must start as any uid.
    """
    return f"{socket.gethostname()}/{os.getpid()}"  # kopf.Identity is a NewType of str


async def run(settings: Settings, *, ready_flag: Optional[threading.Event] = None,
              stop_flag: Optional[threading.Event] = None,
              on_registered: Optional[Callable[[Reconciler], None]] = None, tend_heap: bool = False) -> None:
    """Run until stopped. `tend_heap`: this process is the operator's own, so it may freeze
    its long-lived heap (heap.py) to keep garbage-collector pauses short."""
    registry = kopf.OperatorRegistry()
    metrics = OperatorMetrics()
    kube = KubeApi(client_configuration(settings.kubeconfig), metrics)
    reconciler = register_handlers(registry, settings, kube, metrics)
    if on_registered is not None:
        on_registered(reconciler)
    stop_flag = stop_flag or threading.Event()
    # One identity per run: two replicas embedded in one process (tests) must differ too.
    election = LeaderElection(kube.client, settings.namespace, f"{operator_identity()}/{uuid.uuid4().hex[:8]}")
    http = (asyncio.create_task(metrics.serve(settings.metrics_port, reconciler), name="rtrace-http")
            if settings.metrics_port else None)
    heap = asyncio.create_task(Heap().tend_forever(), name="rtrace-heap") if tend_heap else None
    try:
        # Lead until stopped; a leader that could not renew its Lease (an API server outage,
        # a partition) stops acting at once and stands by again, like a replica that just
        # started: when it can reach the API server it leads again, unless another replica
        # took over meanwhile.
        while await election.acquire(stop_flag):
            lost, stop_kopf = asyncio.Event(), asyncio.Event()
            holding = asyncio.create_task(election.hold(lost), name="rtrace-leader")
            ending = asyncio.create_task(_either(stop_flag, lost, stop_kopf), name="rtrace-stop")
            try:
                await kopf.operator(
                    registry=registry,
                    settings=kopf_settings(settings),
                    clusterwide=True,
                    standalone=True,
                    identity=operator_identity(),
                    ready_flag=ready_flag,
                    stop_flag=stop_kopf,
                )
            finally:
                holding.cancel()
                ending.cancel()
                if not lost.is_set():
                    await asyncio.to_thread(election.release)
            if not lost.is_set():
                return   # stopped (stop_flag, or SIGTERM handled by kopf)
            log.warning("standing by after losing the Lease %s/%s", settings.namespace, election.name)
    finally:
        if heap is not None:
            heap.cancel()
        if http is not None:
            http.cancel()
            await metrics.stop()
        kube.close()


async def _either(stop_flag: threading.Event, lost: asyncio.Event, stop_kopf: asyncio.Event) -> None:
    """Stop kopf when the caller asks (SIGTERM, an embedding test) or leadership is lost."""
    while not (stop_flag.is_set() or lost.is_set()):
        await asyncio.sleep(0.2)
    stop_kopf.set()


class EmbeddedOperator:
    """The operator in a background thread of this process: `start()`, then `stop()`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ready = threading.Event()
        self._stop = threading.Event()
        self.reconciler: Optional[Reconciler] = None
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._main, name="retransmit-operator", daemon=True)

    def _main(self) -> None:
        def registered(reconciler: Reconciler) -> None:
            self.reconciler = reconciler
        try:
            asyncio.run(run(self.settings, ready_flag=self.ready, stop_flag=self._stop, on_registered=registered))
        except BaseException as e:  # kept for the caller to see
            self.error = e

    def start(self, timeout: float = 60, wait_ready: bool = True) -> "EmbeddedOperator":
        """Start the thread; wait until kopf is ready unless `wait_ready` is False (a standby
        replica is ready only once it leads)."""
        self._thread.start()
        if wait_ready and not self.ready.wait(timeout):
            raise TimeoutError(f"operator not ready after {timeout}s (error: {self.error})")
        return self

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def alive(self) -> bool:
        return self._thread.is_alive()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="retransmit-operator", description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", help="kubeconfig to use (default: in-cluster, then $KUBECONFIG)")
    parser.add_argument("--namespace", help="namespace for the agents' DaemonSets (default: $RTRACE_NAMESPACE)")
    parser.add_argument("--metrics-port", type=int, help="port of /metrics, /healthz, /readyz (0 disables)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in {
        "kubeconfig": args.kubeconfig, "namespace": args.namespace,
        "metrics_port": args.metrics_port, "log_level": args.log_level,
    }.items() if v is not None}
    try:
        settings = Settings.from_env(**overrides)
    except SettingsError as e:
        print(f"retransmit-operator: {e}", file=sys.stderr)
        return 2
    try:
        client_configuration(settings.kubeconfig)
    except (ConfigException, OSError) as e:
        print(f"retransmit-operator: no Kubernetes credentials ({e}): run in a pod with a service account, "
              "or pass --kubeconfig / set KUBECONFIG", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # kopf reports every handled watch event at INFO (pods included): that is DEBUG detail here.
    if settings.log_level != "DEBUG":
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    try:
        asyncio.run(run(settings, tend_heap=True))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
