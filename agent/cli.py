"""The `retransmit-agent` command: `local` (this host, no cluster), `check` (can this node
trace, and how) and `cluster` (DaemonSet pod).

Exit status: 0 done (check: the agent can count), 1 the host cannot trace (KernelProblem;
check: a requirement failed), 2 bad command-line input.
Every failure prints exactly one line on stderr naming the problem and the fix.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn, Optional, Sequence

from pydantic import ValidationError

from retransmit_core.api import DEFAULT_TOP_FLOWS
from retransmit_core.contract import AGENT_SUBCOMMAND, add_agent_arguments, invocation_from_namespace
from retransmit_core.kernelvocab import DEFAULT_FLOW_CAPACITY, DEFAULT_SAMPLES_PER_SECOND
from retransmit_core.validation import format_error

from .filters import UsageError, kernel_config, parse_count, parse_seconds
from .kernelinfo import VMLINUX_BTF
from .preflight import KernelProblem

PROG = "retransmit-agent"
EXIT_PROBLEM = 1
EXIT_USAGE = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line (no usage dump) with exit status 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: {message} (see {self.prog} --help)\n")
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description="Count TCP retransmits with a BPF program on tcp:tcp_retransmit_skb.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    local = sub.add_parser("local", help="trace this host and show top flows (root, no cluster)")
    local.add_argument("--duration", help="how long to trace, e.g. 30s or 5m (default: until Ctrl-C)")
    local.add_argument("--interval", default="2s", help="table refresh period (default 2s)")
    local.add_argument("--top", default=str(DEFAULT_TOP_FLOWS),
                       help=f"flows to show, busiest first; 0 = all (default {DEFAULT_TOP_FLOWS})")
    local.add_argument("--output", choices=["table", "json"], default="table",
                       help="table: live table; json: the node report at exit on stdout")
    local.add_argument("--family", action="append", default=[], metavar="IPv4|IPv6", help="repeatable")
    local.add_argument("--port", action="append", default=[], metavar="N", help="local or remote port; repeatable")
    local.add_argument("--remote-cidr", action="append", default=[], metavar="CIDR", help="repeatable")
    local.add_argument("--state", action="append", default=[], metavar="NAME",
                       help="TCP state as the kernel names it, e.g. ESTABLISHED; repeatable")
    local.add_argument("--events", action="store_true",
                       help="stream sampled events as newline-delimited JSON on stdout")
    local.add_argument("--max-events-per-second", default=str(DEFAULT_SAMPLES_PER_SECOND), metavar="N",
                       help=f"samples per second from the kernel (default {DEFAULT_SAMPLES_PER_SECOND}; 0 = none); "
                            "drops are counted")
    local.add_argument("--flow-capacity", default=str(DEFAULT_FLOW_CAPACITY), metavar="N",
                       help="flows kept per IP family in the kernel (LRU); totals stay exact beyond it")
    local.add_argument("--tracefs", default=None, help="tracefs mount to use instead of probing")
    local.add_argument("--btf", default=VMLINUX_BTF, metavar="PATH",
                       help=f"kernel BTF for retransmit causes (default {VMLINUX_BTF}; a missing file: causes unknown)")

    check = sub.add_parser("check", help="one line per requirement: can this node count, in which mode")
    check.add_argument("--output", choices=["table", "json"], default="table")
    check.add_argument("--tracefs", default=None, help="tracefs mount to check instead of probing")

    cluster = sub.add_parser(AGENT_SUBCOMMAND, help="run as the DaemonSet agent of a RetransmitTrace")
    add_agent_arguments(cluster)
    return parser


def local_options(ns: argparse.Namespace):
    """LocalOptions from parsed `local` arguments; UsageError names the bad option."""
    from .local import LocalOptions

    config = kernel_config(
        families=ns.family, ports=ns.port, remote_cidrs=ns.remote_cidr, states=ns.state,
        samples_per_second=parse_count("--max-events-per-second", ns.max_events_per_second),
        flow_capacity=parse_count("--flow-capacity", ns.flow_capacity, minimum=1),
    )
    return LocalOptions(
        config=config,
        duration=parse_seconds("--duration", ns.duration) if ns.duration is not None else None,
        interval=parse_seconds("--interval", ns.interval),
        top=parse_count("--top", ns.top),
        output=ns.output,
        events=ns.events,
        tracefs=ns.tracefs,
        btf=ns.btf,
    )


def run_check(output: str, tracefs: Optional[str]) -> int:
    import json
    from dataclasses import asdict

    from .check import can_count, evaluate, gather_facts

    lines = evaluate(gather_facts(tracefs))
    if output == "json":
        print(json.dumps({"canCount": can_count(lines), "checks": [asdict(line) for line in lines]}, indent=2))
    else:
        print("\n".join(line.render() for line in lines))
    return 0 if can_count(lines) else EXIT_PROBLEM


def main(argv: Optional[Sequence[str]] = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        if ns.command == "local":
            from .local import run_local

            return run_local(local_options(ns))
        if ns.command == "check":
            return run_check(ns.output, ns.tracefs)
        from .cluster import run  # written for the DaemonSet; imported only when used

        return run(invocation_from_namespace(ns))
    except UsageError as exc:
        print(f"{PROG} {ns.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ValidationError as exc:  # the --spec JSON the operator rendered failing validation
        print(f"{PROG} {ns.command}: --spec: {format_error(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:
        print(f"{PROG} {ns.command}: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_USAGE
    except KernelProblem as exc:
        print(f"{PROG} {ns.command}: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
