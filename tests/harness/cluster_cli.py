"""`make cluster-up` / `make cluster-down`: the test control plane plus node simulator and the
kube-proxy that routes Services between all nodes (tests/harness/kubeproxy.py), run by hand in
the background so kubectl, helm and the operator can be pointed at it.

    python -m tests.harness.cluster_cli up   [--state DIR] [--nodes node-a,node-b] [--real-node [--image IMG]...]
    python -m tests.harness.cluster_cli down [--state DIR]
    python -m tests.harness.cluster_cli run  [--state DIR]   # foreground, what `up` starts

State (kubeconfig, logs, pid file, pod dirs) lives in DIR (default /tmp/rtrace-cluster).
`up` prints `export KUBECONFIG=DIR/kubeconfig` on its last line.

--real-node adds a real node (tests/harness/realnode.py: kubelet + containerd on this host,
state in DIR/real-node) beside the simulated ones, with the project's images IMG (each
--image; by default $RTRACE_TEST_OPERATOR_IMAGE and $RTRACE_TEST_AGENT_IMAGE, which the
Makefile sets) imported: `helm install` onto it with operator.image.pullPolicy=Never and
agent.image.pullPolicy=Never.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

DEFAULT_STATE = Path(os.environ.get("RTRACE_CLUSTER_DIR", "/tmp/rtrace-cluster"))


def _pid(state: Path):
    try:
        pid = int((state / "cluster.pid").read_text())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid


def run(state: Path, nodes: list[str], real_node: bool = False, images: Sequence[str] = ()) -> int:
    """Foreground: start both, write DIR/kubeconfig and DIR/ready, wait for SIGTERM/SIGINT."""
    from .controlplane import ControlPlane
    from .kubeproxy import KubeProxy, real_node_network, simulator_network
    from .nodesim import NodeSimulator
    from .realnode import RealNode

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    (state / "cluster.pid").write_text(f"{os.getpid()}\n")
    cp_dir = state / "control-plane"
    shutil.rmtree(cp_dir, ignore_errors=True)
    with ControlPlane(workdir=cp_dir) as cp:
        # One kube-proxy for every node: they all share this host's network namespace.
        with NodeSimulator(cp.kubeconfig, nodes, state_dir=state / "nodes") as sim, \
                (RealNode(cp, images=images, state_dir=state / "real-node") if real_node
                 else contextlib.nullcontext()) as real, \
                KubeProxy(cp.kubeconfig, simulator_network(sim), *([real_node_network(real)] if real else []),
                          workdir=sim.state_dir, lock_timeout=60) as proxy:
            kubeconfig = state / "kubeconfig"
            shutil.copy(cp.kubeconfig, kubeconfig)
            (state / "ready").write_text(f"{cp.server}\n")
            print(f"control plane {cp.server} up in {cp.startup_seconds:.1f}s; nodes "
                  f"{', '.join(n.name for n in sim.nodes)}; logs in {cp_dir}, pod logs in "
                  f"{sim.state_dir / 'pods'}; kube-proxy (nftables) routes Services, log {proxy.log}",
                  flush=True)
            if real is not None:
                print(f"real node {real.name} (kubelet + containerd) up in {real.timings['total']:.1f}s "
                      f"with images {', '.join(images) or '(none)'}; logs in {real.state}", flush=True)
            done.wait()
    (state / "ready").unlink(missing_ok=True)
    (state / "cluster.pid").unlink(missing_ok=True)
    return 0


def up(state: Path, nodes: list[str], real_node: bool = False, images: Sequence[str] = (),
       timeout: float = 420) -> int:
    if _pid(state) and (state / "ready").exists():
        print(f"cluster already running (pid {_pid(state)})", file=sys.stderr)
        print(f"export KUBECONFIG={state / 'kubeconfig'}")
        return 0
    state.mkdir(parents=True, exist_ok=True)
    (state / "ready").unlink(missing_ok=True)
    logfile = state / "cluster.log"
    with open(logfile, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.harness.cluster_cli", "run", "--state", str(state),
             "--nodes", ",".join(nodes), *(["--real-node", *(arg for image in images for arg in ("--image", image))] if real_node else [])],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=Path(__file__).resolve().parents[2], start_new_session=True)
    deadline = time.monotonic() + timeout
    while not (state / "ready").exists():
        if proc.poll() is not None:
            print(f"cluster failed to start (exit {proc.returncode}); see {logfile}:", file=sys.stderr)
            print(logfile.read_text(errors="replace")[-3000:], file=sys.stderr)
            return 1
        if time.monotonic() > deadline:
            proc.terminate()
            print(f"cluster not ready after {timeout:.0f}s; see {logfile}", file=sys.stderr)
            return 1
        time.sleep(0.3)
    print(f"cluster up (pid {proc.pid}, API {(state / 'ready').read_text().strip()}); "
          f"logs: {logfile}; stop with `make cluster-down`", file=sys.stderr)
    print(f"export KUBECONFIG={state / 'kubeconfig'}")
    return 0


def clean_up_dead_real_node(state: Path) -> None:
    """A real node whose cluster process was killed leaves containers, its bridge and host
    changes behind: undo them (only when no real node is alive on this host)."""
    from .realnode import RealNodeError, acquire_node_lock, clean_up_dead_node

    if not (state / "real-node" / "host-before.json").exists():
        return
    try:
        fd = acquire_node_lock()
    except RealNodeError as e:
        print(f"not cleaning up {state / 'real-node'}: {e}")
        return
    try:
        clean_up_dead_node(state / "real-node")
        print(f"cleaned up after the real node of a dead cluster ({state / 'real-node'})")
    finally:
        os.close(fd)


def down(state: Path, timeout: float = 240) -> int:
    pid = _pid(state)
    if pid is None:
        clean_up_dead_real_node(state)
        print(f"no cluster running from {state}")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid(state) == pid and time.monotonic() < deadline:
        time.sleep(0.2)
    if _pid(state) == pid:
        os.kill(pid, signal.SIGKILL)  # its children die with it (PR_SET_PDEATHSIG)
        print(f"cluster (pid {pid}) did not stop in {timeout:.0f}s: killed")
        deadline = time.monotonic() + 30
        while _pid(state) == pid and time.monotonic() < deadline:
            time.sleep(0.2)
        clean_up_dead_real_node(state)
    else:
        print(f"cluster (pid {pid}) stopped")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.cluster_cli", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["up", "down", "run"])
    parser.add_argument("--state", type=Path, default=DEFAULT_STATE)
    parser.add_argument("--nodes", default="node-a,node-b")
    parser.add_argument("--real-node", action="store_true", help="add a real kubelet + containerd node")
    parser.add_argument("--image", action="append", dest="images",
                        help="a project image to import into the real node (podman); repeatable")
    args = parser.parse_args(argv)
    if args.images is None:
        args.images = [image for image in (os.environ.get("RTRACE_TEST_OPERATOR_IMAGE"),
                                           os.environ.get("RTRACE_TEST_AGENT_IMAGE")) if image]
    nodes = [n for n in args.nodes.split(",") if n]
    if args.command == "up":
        return up(args.state, nodes, args.real_node, args.images)
    if args.command == "down":
        return down(args.state)
    return run(args.state, nodes, args.real_node, args.images)


if __name__ == "__main__":
    sys.exit(main())
