"""Command-line filter and option values parsed into a KernelConfig, with errors naming the fix.

Each parser takes the option's text and raises UsageError("--option 'value': why; fix").
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, Optional

from retransmit_core.api import parse_duration
from retransmit_core.kernelvocab import DEFAULT_SAMPLES_PER_SECOND, TCP_STATES

from .kernel import KernelConfig


class UsageError(ValueError):
    """A bad command-line value; str() is the one line to print (exit status 2)."""


def parse_family(text: str) -> str:
    """'IPv4'/'IPv6' from 'IPv4', 'ipv6', '4', '6'."""
    key = text.strip().lower().removeprefix("ip").removeprefix("v")
    if key in ("4", "6"):
        return f"IPv{key}"
    raise UsageError(f"--family {text!r}: not an IP family; use IPv4 or IPv6 (repeat the option for both)")


def parse_port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise UsageError(f"--port {text!r}: not a TCP port; use a number from 1 to 65535")
    return port


def parse_cidr(text: str) -> str:
    """The network in canonical form ('10.1.2.3/8' -> '10.0.0.0/8'); a bare address is a /32 or /128."""
    try:
        return str(ipaddress.ip_network(text.strip(), strict=False))
    except ValueError:
        raise UsageError(
            f"--remote-cidr {text!r}: not a CIDR; use ADDRESS/PREFIX such as 10.0.0.0/8 or fd00::/8"
        ) from None


def parse_state(text: str) -> str:
    """Kernel state name without TCP_ from 'ESTABLISHED', 'established', 'TCP_SYN_SENT', 'syn-sent'."""
    name = text.strip().upper().replace("-", "_").removeprefix("TCP_")
    if name not in TCP_STATES:
        raise UsageError(f"--state {text!r}: not a TCP state; use one of {', '.join(TCP_STATES)}")
    return name


def parse_seconds(option: str, text: str, minimum: float = 0.0) -> float:
    """A Go-style duration ('30s', '2m', '1m30s') in seconds, for `option`."""
    try:
        seconds = parse_duration(text)
    except ValueError:
        raise UsageError(f"{option} {text!r}: not a duration; use a number and a unit, e.g. 30s, 2m or 1m30s") from None
    if seconds <= minimum:
        raise UsageError(f"{option} {text!r}: must be longer than {minimum:g}s")
    return seconds


def parse_count(option: str, text: str, minimum: int = 0) -> int:
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise UsageError(f"{option} {text!r}: use a whole number of at least {minimum}")
    return value


def kernel_config(
    families: Iterable[str] = (),
    ports: Iterable[str] = (),
    remote_cidrs: Iterable[str] = (),
    states: Iterable[str] = (),
    samples_per_second: int = DEFAULT_SAMPLES_PER_SECOND,
    flow_capacity: Optional[int] = None,
) -> KernelConfig:
    """The KernelConfig for repeatable command-line filters (empty = no restriction)."""
    fams = frozenset(parse_family(f) for f in families) or frozenset({"IPv4", "IPv6"})
    extra = {} if flow_capacity is None else {"flow_capacity": flow_capacity}
    return KernelConfig(
        families=fams,
        ports=frozenset(parse_port(p) for p in ports),
        remote_cidrs=tuple(dict.fromkeys(parse_cidr(c) for c in remote_cidrs)),
        states=frozenset(parse_state(s) for s in states),
        samples_per_second=samples_per_second,
        **extra,
    )
