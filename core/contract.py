"""The operator-agent contract: how the DaemonSet template invokes `retransmit-agent cluster`.

Declared once here; the operator renders it (render_agent_args/AGENT_ENV) and the agent
parses it (parse_agent_args). The whole trace spec travels as one JSON argument validated
by the same pydantic model on both sides, so a new spec field needs no new flag.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Optional, Sequence

from .api import RetransmitTraceSpec, to_api

AGENT_SUBCOMMAND = "cluster"
# Linux refuses to exec a program with any one argument longer than this (MAX_ARG_STRLEN,
# 32 pages): the spec's schema bounds keep the --spec argument well below it, and
# tests/unit/test_spec_size_bound.py computes the largest spec the schema admits.
MAX_ARGUMENT_BYTES = 32 * 4096

# Environment the DaemonSet sets through the downward API; the agent reads every one
# (agent/cluster.py): its node, the namespace its report goes to, the address it binds.
ENV_NODE_NAME = "RTRACE_NODE_NAME"          # spec.nodeName
ENV_POD_NAMESPACE = "RTRACE_POD_NAMESPACE"  # metadata.namespace
# The agent binds /metrics, /readyz and /livez to this address (the node's IP: the pod is
# hostNetwork), so probes reach this pod's agent even when several nodes share one host.
ENV_POD_IP = "RTRACE_POD_IP"                # status.podIP
# The host's /proc, mounted read-only at HOST_PROC_MOUNT: the agent is not hostPID, so its own
# /proc shows only its container's processes, and it finds each pod's network namespace
# through a process of the pod (retransmit_agent.podsegments). Unset: "/proc" (an agent in
# the host's PID namespace, `retransmit-agent local`).
ENV_HOST_PROC = "RTRACE_HOST_PROC"
HOST_PROC_MOUNT = "/host/proc"
# The host's /sys/fs/cgroup, mounted read-only here: the agent names a socket by its cgroup's
# directory in the host's cgroup v2 hierarchy (retransmit_agent.cgroups; on hybrid hosts the
# unified/ directory inside it).
HOST_CGROUP_MOUNT = "/host/sys/fs/cgroup"
DOWNWARD_API_ENV: dict[str, str] = {
    ENV_NODE_NAME: "spec.nodeName",
    ENV_POD_NAMESPACE: "metadata.namespace",
    ENV_POD_IP: "status.podIP",
}

DEFAULT_METRICS_PORT = 9464
# A trace's agents listen on the operator's base port + crc32(trace name) % this span
# (render.agent_metrics_port); the settings' upper bound for the base port follows from it.
METRICS_PORT_SPAN = 100


@dataclass(frozen=True)
class AgentInvocation:
    """Everything `retransmit-agent cluster` is told by its pod."""

    trace: str
    spec: RetransmitTraceSpec
    # The trace's metadata.uid: the agent's report names the trace as its owner.
    trace_uid: str = ""
    metrics_port: int = DEFAULT_METRICS_PORT
    # Where to look for tracefs; only a test points it elsewhere (a node without the tracepoint).
    tracefs: Optional[str] = None


def render_agent_args(inv: AgentInvocation) -> list[str]:
    """Container args (after the `retransmit-agent` command) for this invocation."""
    args = [
        AGENT_SUBCOMMAND,
        "--trace", inv.trace,
        "--trace-uid", inv.trace_uid,
        "--spec", json.dumps(to_api(inv.spec), sort_keys=True, separators=(",", ":")),
        "--metrics-port", str(inv.metrics_port),
    ]
    if inv.tracefs:
        args += ["--tracefs", inv.tracefs]
    return args


def add_agent_arguments(parser: argparse.ArgumentParser) -> None:
    """The `cluster` subcommand's options, matching render_agent_args."""
    parser.add_argument("--trace", required=True, help="name of the RetransmitTrace")
    parser.add_argument("--spec", required=True, help="the trace's spec as JSON")
    parser.add_argument("--trace-uid", required=True, help="metadata.uid of the RetransmitTrace (owner of the report)")
    parser.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT)
    parser.add_argument("--tracefs", default=None, help="tracefs mount to use instead of probing")


def invocation_from_namespace(ns: argparse.Namespace) -> AgentInvocation:
    return AgentInvocation(
        trace=ns.trace,
        spec=RetransmitTraceSpec.model_validate_json(ns.spec),
        trace_uid=ns.trace_uid,
        metrics_port=ns.metrics_port,
        tracefs=ns.tracefs,
    )


def parse_agent_args(argv: Sequence[str]) -> AgentInvocation:
    """Inverse of render_agent_args (argv without the program name)."""
    parser = argparse.ArgumentParser(prog="retransmit-agent")
    sub = parser.add_subparsers(dest="command", required=True)
    add_agent_arguments(sub.add_parser(AGENT_SUBCOMMAND))
    return invocation_from_namespace(parser.parse_args(list(argv)))
