"""`retransmit-operator`: run the operator (kopf, cluster-wide, standalone: one replica, no
peering CRD), or embed it in a thread with `EmbeddedOperator`.

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
from typing import Callable, Optional, Sequence

import kopf
from kubernetes.config import ConfigException

from .handlers import Reconciler, kopf_settings, register_handlers
from .kube import client_configuration
from .settings import Settings, SettingsError


def operator_identity() -> str:
    """Who this operator process is, for kopf: the pod's name (its hostname) and pid.

    kopf would otherwise derive it from getpass.getuser(), which raises for a uid without a
    passwd entry: containerd and CRI-O add none for the image's user, and OpenShift's
    restricted SCC runs the pod as an arbitrary uid. The operator must start as any uid.
    """
    return f"{socket.gethostname()}/{os.getpid()}"  # kopf.Identity is a NewType of str


async def run(settings: Settings, *, ready_flag: Optional[threading.Event] = None,
              stop_flag: Optional[threading.Event] = None,
              on_registered: Optional[Callable[[Reconciler], None]] = None) -> None:
    registry = kopf.OperatorRegistry()
    reconciler = register_handlers(registry, settings)
    if on_registered is not None:
        on_registered(reconciler)
    try:
        await kopf.operator(
            registry=registry,
            settings=kopf_settings(settings),
            clusterwide=True,
            standalone=True,
            identity=operator_identity(),
            ready_flag=ready_flag,
            stop_flag=stop_flag,
        )
    finally:
        reconciler.kube.close()


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

    def start(self, timeout: float = 60) -> "EmbeddedOperator":
        self._thread.start()
        if not self.ready.wait(timeout):
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
        asyncio.run(run(settings))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
