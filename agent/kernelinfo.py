"""What the running kernel offers the program: tracepoint fields and BPF helpers, probed.

Nothing here is inferred from the kernel version: RHEL backports features to old version
numbers, and other distributions leave some out. The tracepoints' format files say which
fields exist (bcc builds `args` from the same files), and a tiny program load says whether
a helper exists. The result becomes the program's compile-time switches.

    layout = read_layout(tracefs)          # TracepointLayout: fields of both tracepoints
    features = probe_features(tracefs)     # KernelFeatures: layout + helpers + buffer kind
    features.switches()                    # ["-DHAVE_SKB_STATE", "-DHAVE_JIFFIES64", ...]
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

SKB = "tcp_retransmit_skb"
SYNACK = "tcp_retransmit_synack"

# What the program reads on every kernel since 4.15 (both tracepoints have these).
REQUIRED_FIELDS: tuple[str, ...] = ("sport", "dport", "saddr_v6", "daddr_v6")

# Optional fields of tcp_retransmit_skb, the kernel that added each, and the program's
# switch for it (None: the program does not read it; reported by `check` only).
OPTIONAL_FIELDS: dict[str, tuple[str, Optional[str]]] = {
    "state": ("5.0", "HAVE_SKB_STATE"),
    "family": ("5.12", None),   # the socket's family; the wire's comes from the addresses
    "err": ("6.17", "HAVE_SKB_ERR"),
}

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"

# Linux 5.2 raised the program size limit from 4,096 instructions (BPF_MAXINSNS).
OLD_KERNEL_MAX_INSNS = 4096


def parse_format_fields(text: str) -> frozenset[str]:
    """Field names declared in a tracepoint format file (`field:unsigned short sport;`)."""
    fields = set()
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("field:"):
            declaration = line.split(";", 1)[0].removeprefix("field:")
            fields.add(declaration.split()[-1].split("[", 1)[0])
    return frozenset(fields)


@dataclass(frozen=True)
class TracepointLayout:
    """The fields of tcp:tcp_retransmit_skb and tcp:tcp_retransmit_synack on this kernel."""

    skb: frozenset[str]
    synack: frozenset[str]

    def has(self, field: str) -> bool:
        """tcp_retransmit_skb has `field` (one of OPTIONAL_FIELDS)."""
        return field in self.skb

    def missing(self) -> list[str]:
        """Required fields this kernel lacks, as 'tracepoint.field' (empty: the program fits)."""
        return [f"{tp}.{name}" for tp, fields in ((SKB, self.skb), (SYNACK, self.synack))
                for name in REQUIRED_FIELDS if name not in fields]

    def switches(self) -> list[str]:
        """The program's -D switches for the optional fields present."""
        return [switch for name, (_since, switch) in OPTIONAL_FIELDS.items()
                if switch and self.has(name)]


def read_layout(tracefs: Path) -> TracepointLayout:
    def fields(event: str) -> frozenset[str]:
        return parse_format_fields((tracefs / "events" / "tcp" / event / "format").read_text())
    return TracepointLayout(skb=fields(SKB), synack=fields(SYNACK))


def misses_counted(release: str) -> bool:
    """Whether the kernel counts tracepoint hits it skipped (recursion protection) for
    tracepoint programs: fdinfo's recursion_misses exists since 5.12, but trace_call_bpf()
    counts into it only since 6.7. Nothing can be probed here without provoking a
    recursion, so this one fact follows the version (it only labels a figure unknown)."""
    try:
        major, minor = (int(part) for part in release.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (6, 7)


# ---- BPF helper probing -----------------------------------------------------------------

BPF_PROG_LOAD = 5
BPF_PROG_TYPE_TRACEPOINT = 5
BPF_FUNC_JIFFIES64 = 118
BPF_FUNC_PROBE_READ_KERNEL = 113
_SYS_BPF = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351}


class _BpfInsn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("regs", ctypes.c_uint8),
                ("off", ctypes.c_int16), ("imm", ctypes.c_int32)]


class _ProgLoadAttr(ctypes.Structure):
    # The leading fields of union bpf_attr for BPF_PROG_LOAD, as in Linux 4.15.
    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32),
                ("insns", ctypes.c_uint64), ("license", ctypes.c_uint64),
                ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32),
                ("prog_flags", ctypes.c_uint32)]


def helper_supported(helper_id: int) -> Optional[bool]:
    """Whether a tracepoint program may call helper `helper_id`: load `call; r0 = 0; exit`.

    None when the answer is unknown (no permission to load programs, unknown architecture).
    The verifier refuses an unknown helper with EINVAL, which is the "no" this looks for.
    """
    number = _SYS_BPF.get(os.uname().machine)
    if number is None:
        return None
    program = (_BpfInsn * 3)(
        _BpfInsn(0x85, 0, 0, helper_id),   # call helper_id
        _BpfInsn(0xB7, 0, 0, 0),           # r0 = 0
        _BpfInsn(0x95, 0, 0, 0),           # exit
    )
    license_ = ctypes.create_string_buffer(b"GPL")
    attr = _ProgLoadAttr(prog_type=BPF_PROG_TYPE_TRACEPOINT, insn_cnt=3,
                         insns=ctypes.addressof(program), license=ctypes.addressof(license_))
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(number, BPF_PROG_LOAD, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd >= 0:
        os.close(fd)
        return True
    return False if ctypes.get_errno() == errno.EINVAL else None


def ringbuf_supported() -> bool:
    """True when the kernel can create a BPF_MAP_TYPE_RINGBUF map (5.8+, RHEL 8.4+) and
    bcc has the ring buffer API (0.16+)."""
    from bcc import BPF
    from bcc.libbcc import lib

    if not hasattr(BPF, "ring_buffer_consume"):
        return False
    create = lib.bcc_create_map
    create.restype = ctypes.c_int
    create.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    fd = create(27, b"rtrace_probe", 0, 0, os.sysconf("SC_PAGE_SIZE"), 0)   # 27: BPF_MAP_TYPE_RINGBUF
    if fd < 0:
        return False
    os.close(fd)
    return True


# ---- socket fields through BTF -------------------------------------------------------------

# The program's SOCK_* constant -> (struct, member). skaddr points at the start of a
# struct tcp_sock, whose first members nest inet_connection_sock, inet_sock and sock at
# offset 0, so an offset inside any of them is an offset from skaddr.
SOCK_FIELDS: dict[str, tuple[str, str]] = {
    "SOCK_CA_STATE": ("inet_connection_sock", "icsk_ca_state"),
    "SOCK_RETRANSMITS": ("inet_connection_sock", "icsk_retransmits"),
    "SOCK_SRTT_US": ("tcp_sock", "srtt_us"),
    "SOCK_SND_CWND": ("tcp_sock", "snd_cwnd"),
    "SOCK_PACKETS_OUT": ("tcp_sock", "packets_out"),
    "SOCK_RETRANS_OUT": ("tcp_sock", "retrans_out"),
}
# The connection's own segment counters, read with the fields above: a flow's retransmit
# ratio as the kernel counted it. Optional (-DHAVE_SOCK_SEGS): data_segs_out came in Linux
# 4.6, and a kernel whose BTF lacks either leaves the ratio out, never a made-up zero.
SOCK_SEGS_FIELDS: dict[str, tuple[str, str]] = {
    "SOCK_DATA_SEGS_OUT": ("tcp_sock", "data_segs_out"),
    "SOCK_TOTAL_RETRANS": ("tcp_sock", "total_retrans"),
}
# Each field's size in bits as the program reads it; another size means another layout.
SOCK_FIELD_BITS = {"SOCK_CA_STATE": (1, 8), "SOCK_RETRANSMITS": (8, 8), "SOCK_SRTT_US": (32, 32),
                   "SOCK_SND_CWND": (32, 32), "SOCK_PACKETS_OUT": (32, 32), "SOCK_RETRANS_OUT": (32, 32),
                   "SOCK_DATA_SEGS_OUT": (32, 32), "SOCK_TOTAL_RETRANS": (32, 32)}


@dataclass(frozen=True)
class SockOffsets:
    """Where the socket fields the program reads live on this kernel: -D constants.

    segs: the segment counters (SOCK_SEGS_FIELDS) are among them; segs_problem says why not."""

    defines: tuple[tuple[str, int], ...]
    segs: bool = False
    segs_problem: str = ""

    def switches(self) -> list[str]:
        return (["-DHAVE_SOCK_BTF"] + (["-DHAVE_SOCK_SEGS"] if self.segs else [])
                + [f"-D{name}={value}" for name, value in self.defines])


def _byte_offsets(btf, fields: dict[str, tuple[str, str]]) -> tuple[list[tuple[str, int]], str]:
    """(defines, "") for whole, byte-aligned members of SOCK_FIELD_BITS' sizes, or ([], why not)."""
    from .btf import BtfError

    defines: list[tuple[str, int]] = []
    for name, (struct_name, member_name) in fields.items():
        try:
            member = btf.member(struct_name, member_name)
        except BtfError as e:
            return [], str(e)
        low, high = SOCK_FIELD_BITS[name]
        if not low <= member.bit_size <= high:
            return [], f"{member_name} is {member.bit_size} bits in this kernel's BTF, not {high}"
        if member.bit_offset % 8:
            return [], f"{member_name} is not byte-aligned in this kernel's BTF"
        defines.append((name, member.byte_offset))
    return defines, ""


def resolve_sock_offsets(btf_path: str) -> tuple[Optional[SockOffsets], str]:
    """(offsets, "") from the node's BTF, or (None, why not) when it is missing or its
    layout is not one the program can read (little-endian bitfields only)."""
    import sys

    from .btf import Btf, BtfError

    if sys.byteorder != "little":
        return None, "causes need a little-endian kernel (bitfield layout)"
    try:
        btf = Btf.load(btf_path)
        ca = btf.member(*SOCK_FIELDS["SOCK_CA_STATE"])
    except BtfError as e:
        return None, str(e)
    low, high = SOCK_FIELD_BITS["SOCK_CA_STATE"]
    if not low <= ca.bit_size <= high:
        return None, f"icsk_ca_state is {ca.bit_size} bits in this kernel's BTF, not {high}"
    if ca.bit_offset % 8 + ca.bit_size > 8:
        return None, "icsk_ca_state crosses a byte boundary in this kernel's BTF"
    defines = [("SOCK_CA_STATE_BYTE", ca.byte_offset), ("SOCK_CA_STATE_SHIFT", ca.bit_offset % 8),
               ("SOCK_CA_STATE_MASK", (1 << ca.bit_size) - 1)]
    plain, problem = _byte_offsets(btf, {name: f for name, f in SOCK_FIELDS.items() if name != "SOCK_CA_STATE"})
    if problem:
        return None, problem
    segs, segs_problem = _byte_offsets(btf, SOCK_SEGS_FIELDS)
    return SockOffsets(tuple(defines + plain + segs), segs=bool(segs), segs_problem=segs_problem), ""


# ---- the socket's cgroup through BTF ---------------------------------------------------------

@dataclass(frozen=True)
class CgroupOffsets:
    """Where sk->sk_cgrp_data's cgroup, its kernfs node and that node's id live on this kernel:
    the program's -D constants (bpf/retransmit.bpf.c sock_cgroup). `val_layout`: the layout
    before 5.15 (a u64 `val` holding the pointer unless a low bit says it holds net_cls data)."""

    sock_cgroup: int
    cgroup_kn: int
    kernfs_node_id: int
    val_layout: bool = False

    def switches(self) -> list[str]:
        return (["-DHAVE_SOCK_CGROUP", f"-DSOCK_CGROUP={self.sock_cgroup}", f"-DCGROUP_KN={self.cgroup_kn}",
                 f"-DKERNFS_NODE_ID={self.kernfs_node_id}"] + (["-DSOCK_CGROUP_VAL"] if self.val_layout else []))


def cgroup_offsets(btf) -> tuple[Optional[CgroupOffsets], str]:
    """(offsets, "") when this kernel's BTF has a layout the program reads, else (None, why not):
    struct sock_cgroup_data with a `cgroup` pointer (5.15+) or the older u64 `val`; struct
    cgroup's `kn` pointer; kernfs_node's `id` as one u64 (5.5+: the id is the inode number of
    the cgroup's directory, which is how the agent finds its path)."""
    from .btf import KIND_INT, KIND_PTR, BtfError

    try:
        data = btf.member("sock", "sk_cgrp_data")
        try:
            pointer, val_layout = btf.member("sock_cgroup_data", "cgroup"), False
            if pointer.kind != KIND_PTR:
                return None, "sock_cgroup_data.cgroup is not a pointer in this kernel's BTF"
        except BtfError:
            pointer, val_layout = btf.member("sock_cgroup_data", "val"), True
            if pointer.kind != KIND_INT or pointer.bit_size != 64:
                return None, f"sock_cgroup_data.val is not a u64 in this kernel's BTF ({pointer.bit_size} bits)"
        kn = btf.member("cgroup", "kn")
        ident = btf.member("kernfs_node", "id")
    except BtfError as e:
        return None, str(e)
    if kn.kind != KIND_PTR:
        return None, "cgroup.kn is not a pointer in this kernel's BTF"
    if ident.kind != KIND_INT or ident.bit_size != 64:
        return None, ("kernfs_node.id is not a u64 in this kernel's BTF (a union before Linux 5.5): "
                      "a cgroup's id is not its directory's inode number")
    if (data.bit_offset | pointer.bit_offset | kn.bit_offset | ident.bit_offset) % 8:
        return None, "the socket's cgroup fields are not byte-aligned in this kernel's BTF"
    return CgroupOffsets(data.byte_offset + pointer.byte_offset, kn.byte_offset, ident.byte_offset, val_layout), ""


def resolve_cgroup_offsets(btf_path: Optional[str]) -> tuple[Optional[CgroupOffsets], str]:
    """cgroup_offsets() of the BTF at `btf_path` (None: BTF disabled)."""
    from .btf import Btf, BtfError

    if not btf_path:
        return None, "BTF disabled"
    try:
        return cgroup_offsets(Btf.load(btf_path))
    except BtfError as e:
        return None, str(e)


@dataclass(frozen=True)
class KernelFeatures:
    """Everything the program's compile-time switches depend on."""

    layout: TracepointLayout
    jiffies64: bool
    ringbuf: bool
    sock: Optional[SockOffsets] = None      # None: causes unknown (see sock_problem)
    sock_problem: str = "not probed"
    probe_read_kernel: bool = True
    cgroup: Optional[CgroupOffsets] = None  # None: sockets' cgroups unread (see cgroup_problem)
    cgroup_problem: str = "not probed"

    def switches(self) -> list[str]:
        names = self.layout.switches()
        names += ["HAVE_JIFFIES64"] if self.jiffies64 else []
        names += ["USE_RINGBUF"] if self.ringbuf else []
        names += ["HAVE_PROBE_READ_KERNEL"] if (self.sock or self.cgroup) and self.probe_read_kernel else []
        return ([f"-D{name}" for name in names] + (self.sock.switches() if self.sock else [])
                + (self.cgroup.switches() if self.cgroup else []))

    def describe(self) -> str:
        """One line on the mode the program runs in, for logs and the node's report."""
        fields = ", ".join(f"{name} {'yes' if self.layout.has(name) else 'no'}" for name in OPTIONAL_FIELDS)
        causes = "causes from BTF" if self.sock else f"causes unknown ({self.sock_problem})"
        if self.sock:
            causes += ("; flow ratios from BTF" if self.sock.segs
                       else f"; no flow ratios ({self.sock.segs_problem})")
        cgroups = "sockets' cgroups from BTF" if self.cgroup else f"no sockets' cgroups ({self.cgroup_problem})"
        return (f"tracepoint fields: {fields}; {'ring buffer' if self.ringbuf else 'perf buffer'}; "
                f"{'bpf_jiffies64' if self.jiffies64 else 'clock per event'}; {causes}; {cgroups}")


def probe_features(tracefs: Path, ringbuf: Optional[bool] = None, jiffies64: Optional[bool] = None,
                   btf_path: Optional[str] = VMLINUX_BTF, cgroups: bool = True) -> KernelFeatures:
    """Probe the running kernel; `ringbuf`/`jiffies64` force a choice (False works everywhere);
    btf_path None (or a missing file) leaves causes unknown and sockets' cgroups unread;
    cgroups False leaves the latter unread too (a node without cgroup v2)."""
    sock, problem = resolve_sock_offsets(btf_path) if btf_path else (None, "BTF disabled")
    cgroup, cgroup_problem = resolve_cgroup_offsets(btf_path) if cgroups else (None, "not asked for")
    return KernelFeatures(
        layout=read_layout(tracefs),
        jiffies64=bool(helper_supported(BPF_FUNC_JIFFIES64)) if jiffies64 is None else jiffies64,
        ringbuf=ringbuf_supported() if ringbuf is None else ringbuf,
        sock=sock,
        sock_problem=problem,
        probe_read_kernel=bool(helper_supported(BPF_FUNC_PROBE_READ_KERNEL)) if (sock or cgroup) else True,
        cgroup=cgroup,
        cgroup_problem=cgroup_problem,
    )
