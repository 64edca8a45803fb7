"""The agent's kernel program as an older kernel runs it, on this kernel.

In a private mount namespace, copies of the live tcp tracepoint format files with some
fields deleted (offsets unchanged) are bind-mounted over the originals under BOTH tracefs
paths: bcc reads /sys/kernel/debug/tracing when debugfs is mounted, the agent probes
/sys/kernel/tracing first. bcc then pads the deleted fields, the data stays right, and the
program compiles without those fields: the code paths of a 4.15-5.11 kernel. The reference
counter runs outside, on the real layout.

    with OldLayoutAgent(drop=("family", "state"), remote_cidrs=...) as agent:
        agent.features           # what the program saw: "tracepoint fields: state no, ..."
        ... make traffic ...
        result = agent.finish()  # totals, by_state and flows as the program counted them

Run as a module (inside `unshare --mount`, which OldLayoutAgent does), it masks the files,
opens the program, prints one JSON line when attached, and the snapshot after a line on stdin.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

TRACEFS_ROOTS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
# (category, event): the tcp tracepoints, and skb:kfree_skb whose `reason` (5.17+) turns
# drop counting on; a field name is masked wherever it is declared.
TRACEPOINTS = (("tcp", "tcp_retransmit_skb"), ("tcp", "tcp_retransmit_synack"), ("skb", "kfree_skb"))
ROOT = Path(__file__).resolve().parents[2]


def without_fields(format_text: str, drop: Sequence[str]) -> str:
    """A format file without the `field:` lines declaring `drop` (other offsets unchanged)."""
    def declares(line: str, name: str) -> bool:
        declaration = line.strip().split(";", 1)[0]
        return declaration.startswith("field:") and declaration.split()[-1].split("[", 1)[0] == name
    return "".join(line for line in format_text.splitlines(keepends=True)
                   if not any(declares(line, name) for name in drop))


def mask_formats(drop: Sequence[str], workdir: Path) -> list[str]:
    """Bind-mount masked copies over every live format file; returns the paths covered.
    Only call inside a private mount namespace: the mounts would otherwise be the host's."""
    covered = []
    for root in TRACEFS_ROOTS:
        for category, event in TRACEPOINTS:
            live = Path(root) / "events" / category / event / "format"
            if not live.is_file():
                continue
            copy = workdir / f"{root.strip('/').replace('/', '_')}_{event}.format"
            copy.write_text(without_fields(live.read_text(), drop))
            subprocess.run(["mount", "--bind", str(copy), str(live)], check=True)
            covered.append(str(live))
    return covered


class OldLayoutAgent:
    """The kernel program in a child process whose tracepoints lack `drop` fields."""

    def __init__(self, drop: Sequence[str], remote_cidrs: Sequence[str] = (), ringbuf: Optional[bool] = None,
                 jiffies64: Optional[bool] = None, states: Sequence[str] = ()) -> None:
        self.argv = ["unshare", "--mount", "--propagation", "private", sys.executable, "-m", "tests.harness.oldlayout"]
        self.argv += [arg for name in drop for arg in ("--drop", name)]
        self.argv += [arg for cidr in remote_cidrs for arg in ("--remote-cidr", cidr)]
        self.argv += [arg for state in states for arg in ("--state", state)]
        self.argv += [] if ringbuf is None else ["--ringbuf" if ringbuf else "--no-ringbuf"]
        self.argv += [] if jiffies64 is None else ["--jiffies64" if jiffies64 else "--no-jiffies64"]
        self.proc: Optional[subprocess.Popen] = None
        self.attached: dict = {}

    def start(self) -> "OldLayoutAgent":
        self.proc = subprocess.Popen(self.argv, cwd=str(ROOT), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()   # ends when the program is attached or the child failed
        if not line:
            self.proc.wait(timeout=60)
            raise RuntimeError(f"old-layout agent exited {self.proc.returncode}: {self.proc.stderr.read()}")
        self.attached = json.loads(line)
        if "error" in self.attached:
            self.proc.wait(timeout=60)
        return self

    def finish(self) -> dict:
        """Snapshot of the program's counters, then the child exits."""
        out, err = self.proc.communicate("stop\n", timeout=120)
        if self.proc.returncode != 0:
            raise RuntimeError(f"old-layout agent failed ({self.proc.returncode}): {err}")
        return json.loads(out.strip().splitlines()[-1])

    def __enter__(self) -> "OldLayoutAgent":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drop", action="append", default=[])
    parser.add_argument("--remote-cidr", action="append", default=[])
    parser.add_argument("--state", action="append", default=[])
    parser.add_argument("--ringbuf", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--jiffies64", action=argparse.BooleanOptionalAction, default=None)
    args = parser.parse_args(argv)

    from retransmit_agent.kernel import KernelConfig, KernelProblem, RetransmitProgram

    with tempfile.TemporaryDirectory(prefix="rtrace-layout-") as tmp:
        covered = mask_formats(args.drop, Path(tmp))
        config = KernelConfig(remote_cidrs=tuple(args.remote_cidr), states=frozenset(args.state))
        try:
            program = RetransmitProgram.open(config, ringbuf=args.ringbuf, jiffies64=args.jiffies64)
        except KernelProblem as problem:
            print(json.dumps({"error": str(problem), "masked": covered}), flush=True)
            return 1
        with program:
            from retransmit_agent.check import evaluate, gather_facts

            checks = {line.name: line.render() for line in evaluate(gather_facts())}
            print(json.dumps({"features": program.features.describe(), "switches": program.features.switches(),
                              "instructions": program.instruction_counts(), "masked": covered,
                              "counts_drops": program.counts_drops, "checks": checks}), flush=True)
            sys.stdin.readline()
            snap = program.snapshot()
        flows = [[f.family, f.local_ip, f.local_port, f.remote_ip, f.remote_port, f.retransmits,
                  f.synack_retransmits, f.last_state] for f in snap.flow_counters]
        print(json.dumps({"retransmits": snap.retransmits, "synack_retransmits": snap.synack_retransmits,
                          "failed_attempts": snap.failed_attempts, "by_state": snap.by_state,
                          "flows": flows, "drops": None if snap.drops is None else snap.drops.by_reason}),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
