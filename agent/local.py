"""`retransmit-agent local`: trace this host for a while, show a live table or print a JSON report.

No cluster involved. SIGINT and SIGTERM end the run early and still print the result.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Optional, TextIO

from retransmit_core.api import DEFAULT_EVENTS_KEPT, DEFAULT_TOP_FLOWS, NodeStatus, RecentEvent, to_api
from retransmit_core.version import package_version

from .kernel import KernelConfig, RetransmitProgram
from .kernelinfo import VMLINUX_BTF
from .nodeentry import NodeFacts, node_entry

DRAIN_PERIOD = 0.5   # seconds between ring-buffer drains (the program never wakes us)


@dataclass(frozen=True)
class LocalOptions:
    """Everything `retransmit-agent local` was asked for, already validated."""

    config: KernelConfig
    duration: Optional[float] = None   # seconds; None = until SIGINT/SIGTERM
    interval: float = 2.0              # seconds between table refreshes
    top: int = DEFAULT_TOP_FLOWS       # 0 = all flows
    output: str = "table"              # "table" or "json"
    events: bool = False               # stream samples as NDJSON on stdout
    tracefs: Optional[str] = None
    btf: Optional[str] = VMLINUX_BTF        # None or a missing file: causes unknown


def _print_events(events: list[RecentEvent], out: TextIO) -> None:
    for event in events:
        out.write(json.dumps(to_api(event), separators=(",", ":")) + "\n")
    if events:
        out.flush()


def run_local(options: LocalOptions, out: TextIO = sys.stdout) -> int:
    """Trace until the duration ends or a signal arrives; print the result. Returns exit status.

    Raises KernelProblem when the host cannot trace.
    """
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        program = RetransmitProgram.open(options.config, tracefs=options.tracefs, btf=options.btf)
    except BaseException:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        raise
    transport = "ring buffer" if program.uses_ringbuf else "perf buffer"
    print(f"retransmit-agent local: counting on tcp:tcp_retransmit_skb and tcp:tcp_retransmit_synack "
          f"(samples via {transport}); Ctrl-C stops", file=sys.stderr, flush=True)
    facts = NodeFacts(node=socket.gethostname(), kernel_release=os.uname().release, agent_version=package_version())
    recent: deque[RecentEvent] = deque(maxlen=DEFAULT_EVENTS_KEPT)
    started = time.monotonic()
    deadline = started + options.duration if options.duration else None

    def report() -> NodeStatus:
        return node_entry(program.snapshot(), facts, top_flows=options.top, keep_events=DEFAULT_EVENTS_KEPT,
                          now=datetime.now(timezone.utc), recent_events=list(recent)[::-1]).entry

    def drain() -> None:
        fresh = program.drain_events()
        recent.extend(fresh)
        if options.events:
            _print_events(fresh, out)

    live = None
    try:
        if options.output == "table":
            from rich.console import Console
            from rich.live import Live

            from .livetable import render_report

            # With --events, stdout carries NDJSON: the table goes to stderr.
            stream = sys.stderr if options.events else out
            # Not a terminal (a pipe, a log): wide enough that addresses are never cut.
            console = Console(file=stream, width=None if stream.isatty() else 140)
            live = Live(render_report(report(), 0, options.duration), console=console,
                        auto_refresh=False, transient=False)
            live.start()
        next_refresh = started + options.interval
        while not stop.is_set():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            wait = DRAIN_PERIOD if deadline is None else min(DRAIN_PERIOD, deadline - now)
            stop.wait(max(0.0, wait))
            drain()
            if live is not None and time.monotonic() >= next_refresh:
                live.update(render_report(report(), time.monotonic() - started, options.duration), refresh=True)
                next_refresh += options.interval
        drain()
        final = report()
        if live is not None:
            live.update(render_report(final, time.monotonic() - started, options.duration), refresh=True)
            live.stop()
            live = None
        if options.output == "json":
            indent = None if options.events else 2
            out.write(json.dumps(to_api(final), indent=indent) + "\n")
            out.flush()
        return 0
    finally:
        if live is not None:
            live.stop()
        program.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
