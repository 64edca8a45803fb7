"""`python -m tests.harness.nodesim`: the node simulator in the foreground until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Optional

from . import __doc__ as package_doc
from .node import NodeSimulator


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.nodesim", description=package_doc.split("\n")[0])
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
