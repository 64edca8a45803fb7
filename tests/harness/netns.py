"""Private network namespaces with controlled TCP loss (nftables), for real retransmits.

    with LossNamespace() as ns:          # unique name, lo up, GSO/TSO off, own addresses
        ns.random_loss(10)               # drop 10% of TCP segments, SYNs exempt
        ns.run_python("tests.harness.traffic", "bulk", ...)
        ns.clear_loss(); ns.wait_quiet()

Each namespace gets loopback addresses of its own (198.18.0.0/15 and fd00::/8, random per
run), so the flows it makes are distinguishable from every other test's on the host:
tracepoints are global, but these addresses are not shared. Loss is applied on input
(a real drop in flight, not a local send error). Names include the pid and a random
suffix; everything is removed on exit.
"""

from __future__ import annotations

import abc
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]
TABLE = "rtloss"


def _run(argv: Sequence[str], input: Optional[str] = None) -> str:
    done = subprocess.run(list(argv), input=input, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def unique_suffix() -> str:
    return f"{os.getpid()}-{random.randrange(16**4):04x}"


class NftLoss(abc.ABC):
    """TCP loss injected by one nftables table in a network namespace: the rules, and waiting
    for the namespace to go quiet. Shared by a private LossNamespace and a pod's PodNet
    (tests.harness.podtraffic); a subclass has `name` (for messages) and `table`, and says
    how to run a command inside (`enter`) and how its table is made ready for a new rule set
    (`_reset_script`)."""

    name: str
    table: str

    @abc.abstractmethod
    def enter(self, *argv: str) -> list[str]:
        """argv run inside the namespace."""

    @abc.abstractmethod
    def _reset_script(self) -> str:
        """nft commands that leave `table` with an empty input chain."""

    def nft(self, script: str) -> None:
        _run(self.enter("nft", "-f", "-"), input=script)

    def _rules(self, *rules: str) -> None:
        """Replace the input chain's rules with `rules` (none: no loss)."""
        self.nft(self._reset_script() + "".join(f"add rule inet {self.table} input {rule}\n" for rule in rules))

    # ---------------------------------------------------------------- loss rules

    def random_loss(self, percent: int, ports: Sequence[int] = ()) -> None:
        """Drop `percent`% of the TCP segments arriving in the namespace; SYN and SYN-ACK exempt.

        With `ports`, only segments to or from those ports. Only on the way in: a drop on
        the way out is reported to the sender at once (the retransmit fails with an error,
        which the tracepoint reports as a failed attempt), which is not what loss on a
        network looks like. On a namespace's loopback that is both directions; between two
        pods, loss in both directions means this on both.
        """
        match = "tcp flags & syn == 0"
        if ports:
            port_set = ", ".join(str(p) for p in ports)
            self._rules(f"{match} tcp dport {{ {port_set} }} numgen random mod 100 < {percent} drop",
                        f"{match} tcp sport {{ {port_set} }} numgen random mod 100 < {percent} drop")
        else:
            self._rules(f"meta l4proto tcp {match} numgen random mod 100 < {percent} drop")

    def data_loss_from(self, sources: Sequence[str], percent: int) -> None:
        """Drop `percent`% of the data-carrying TCP segments arriving from `sources` (addresses
        or prefixes), counted: loss on one direction of one path. Pure ACKs (IP + TCP headers
        with options stay under 120 bytes) pass, so the other direction stays clean."""
        self._rules(*(f"{'ip6' if ':' in src else 'ip'} saddr {src} tcp flags & syn == 0 meta length > 120 "
                      f"numgen random mod 100 < {percent} counter drop" for src in sources))

    def drop_syns(self, port: int, percent: int = 100) -> None:
        """Drop SYNs to `port`: the client retransmits them in SYN_SENT."""
        chance = "" if percent >= 100 else f" numgen random mod 100 < {percent}"
        self._rules(f"tcp dport {port} tcp flags & (syn | ack) == syn{chance} drop")

    def drop_handshake_acks(self, port: int) -> None:
        """Drop every non-SYN segment to `port`: the handshake's final ACK never arrives,
        so the server retransmits its SYN-ACK (clients must stay silent meanwhile)."""
        self._rules(f"tcp dport {port} tcp flags & syn == 0 drop")

    def drop_everything(self) -> None:
        """Drop every TCP segment: a dead path (senders time out and back off)."""
        self._rules("meta l4proto tcp drop")

    def drop_tail_segments(self, port: int, percent: int) -> None:
        """Drop `percent`% of the segments from `port` that carry PSH: the last segment of
        each write, so the receiver sees no later segment and the sender needs a probe."""
        self._rules(f"tcp sport {port} tcp flags & psh == psh numgen random mod 100 < {percent} drop")

    def clear_loss(self) -> None:
        self._rules()

    # ---------------------------------------------------------------- quiet

    def busy_sockets(self) -> list[str]:
        """TCP sockets that could still retransmit (anything but LISTEN and TIME-WAIT)."""
        out = _run(self.enter("ss", "-Htan", "state", "all", "exclude", "listening", "exclude", "time-wait"))
        return [l for l in out.splitlines() if l.strip()]

    def wait_quiet(self, timeout: float = 60.0) -> None:
        """Wait until no socket can retransmit any more (call after clear_loss)."""
        deadline = time.monotonic() + timeout
        while True:
            busy = self.busy_sockets()
            if not busy:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"namespace {self.name} still has sockets after {timeout}s: {busy[:5]}")
            time.sleep(0.2)


@dataclass
class LossNamespace(NftLoss):
    """A network namespace whose loopback carries test traffic through an nftables loss rule."""

    table: ClassVar[str] = TABLE

    prefix: str = "rt"
    name: str = ""
    v4: tuple[str, str] = ("", "")     # two IPv4 addresses on lo: (a, b)
    v6: tuple[str, str] = ("", "")     # two IPv6 addresses on lo
    _procs: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.name = self.name or f"{self.prefix}-{unique_suffix()}"
        net = random.randrange(2 * 256 * 256 // 4)          # a /30-ish slot in 198.18.0.0/15
        base = (198 << 24) | (18 << 16) | (net * 4)
        self.v4 = tuple(f"{(base + i) >> 24 & 255}.{(base + i) >> 16 & 255}.{(base + i) >> 8 & 255}.{(base + i) & 255}"
                        for i in (1, 2))  # type: ignore[assignment]
        tag = random.randrange(1, 2**32)
        self.v6 = (f"fd00:{tag >> 16:x}:{tag & 0xffff:x}::1", f"fd00:{tag >> 16:x}:{tag & 0xffff:x}::2")

    # ---------------------------------------------------------------- lifecycle

    def create(self) -> "LossNamespace":
        _run(["ip", "netns", "add", self.name])
        try:
            # Ethernet-sized segments: a few MB make thousands of segments to lose.
            self.ip("link", "set", "lo", "mtu", "1500", "up")
            for addr in self.v4:
                self.ip("addr", "add", f"{addr}/32", "dev", "lo")
            for addr in self.v6:
                self.ip("-6", "addr", "add", f"{addr}/128", "dev", "lo", "nodad")
            # One skb = one segment, so retransmit events and RetransSegs line up closely.
            self.exec("ethtool", "-K", "lo", "gso", "off", "tso", "off")
            self.nft(f"add table inet {TABLE}\n"
                     f"add chain inet {TABLE} input {{ type filter hook input priority 0; policy accept; }}\n")
        except Exception:
            self.destroy()
            raise
        return self

    def destroy(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self._procs.clear()
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)

    def __enter__(self) -> "LossNamespace":
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    # ---------------------------------------------------------------- running things inside

    def enter(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def exec(self, *argv: str) -> str:
        return _run(self.enter(*argv))

    def ip(self, *argv: str) -> str:
        return _run(["ip", "-n", self.name, *argv])

    def popen(self, *argv: str, **kwargs) -> subprocess.Popen:
        """A process inside the namespace; killed on destroy() if still running."""
        kwargs.setdefault("cwd", str(ROOT))
        proc = subprocess.Popen(self.enter(*argv), **kwargs)
        self._procs.append(proc)
        return proc

    def python(self, module: str, *args: str, **kwargs) -> subprocess.Popen:
        """`python -m module args` inside the namespace with this venv's interpreter."""
        return self.popen(sys.executable, "-m", module, *args, **kwargs)

    def _reset_script(self) -> str:
        return f"flush chain inet {TABLE} input\n"

    # ---------------------------------------------------------------- ground truth

    def snmp_tcp(self) -> dict[str, int]:
        """The namespace's /proc/net/snmp Tcp: counters (RetransSegs, OutSegs, ...)."""
        lines = [l.split() for l in self.exec("cat", "/proc/net/snmp").splitlines() if l.startswith("Tcp:")]
        header, values = lines[0][1:], lines[1][1:]
        return {k: int(v) for k, v in zip(header, values)}
