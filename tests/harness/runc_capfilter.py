#!/usr/bin/python3
"""TEST-ONLY runc wrapper for the real node (tests/harness/realnode.py): drops, from a
container's capability sets, the capabilities this host's bounding set lacks, then execs
runc with the same arguments.

Why: the machine the tests run on withholds CAP_SYS_RESOURCE from every process (see CapBnd
in /proc/self/status), so runc cannot grant it and fails the container ("operation not
permitted"). A privileged container asks for every capability, and the agent's
`capabilities` security mode asks for BPF, PERFMON and SYS_RESOURCE. podman quietly does the
same filtering; containerd does not. On a normal node the bounding set is full and this
wrapper changes nothing. It is never part of what the project ships: the chart and the
operator render the DaemonSet unchanged, and the agent works with BPF + PERFMON on kernels
that no longer charge BPF maps to RLIMIT_MEMLOCK (5.11+, this host's 6.18).

A test may also play a runtime that does not grant some capabilities to unprivileged
containers: when the file named by RTRACE_CAPFILTER_WITHHOLD (env, set on containerd by
realnode.py, inherited by its shims and so by this wrapper) exists, the capability names in
it (one per line, e.g. CAP_PERFMON) are dropped too from every container that does not ask
for CAP_SYS_ADMIN (a privileged container asks for every capability, and keeps them).

containerd's runc shim calls `<BinaryName> [global flags] create --bundle DIR ... ID` (and
`run`); `exec --process FILE` carries a process spec of its own. Both are filtered.
Usage (containerd config): runtimes.runc.options.BinaryName = this file; RTRACE_RUNC (env)
or /usr/sbin/runc is the real runc.
"""

from __future__ import annotations

import json
import os
import sys

# Linux capability numbers (include/uapi/linux/capability.h), 0..40.
CAPABILITIES = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
    "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
    "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
)


def bounding_set() -> set[str]:
    """CAP_<name> for every capability in this process's bounding set."""
    with open("/proc/self/status") as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("CapBnd:"))
    return {f"CAP_{name}" for bit, name in enumerate(CAPABILITIES) if mask >> bit & 1}


def filter_process(process: dict, allowed: set[str]) -> list[str]:
    """Remove capabilities outside `allowed` from a process spec in place; what was removed."""
    removed: set[str] = set()
    caps = process.get("capabilities") or {}
    for kind, names in caps.items():
        if isinstance(names, list):
            keep = [n for n in names if n in allowed]
            removed.update(n for n in names if n not in allowed)
            caps[kind] = keep
    return sorted(removed)


def withheld() -> set[str]:
    """Capabilities the test's runtime does not grant unprivileged containers (none unless
    the RTRACE_CAPFILTER_WITHHOLD file exists)."""
    path = os.environ.get("RTRACE_CAPFILTER_WITHHOLD")
    if not path or not os.path.exists(path):
        return set()
    with open(path) as f:
        return {line.strip() for line in f if line.strip()}


def allowed_for(process: dict, bounding: set[str], withheld: set[str]) -> set[str]:
    """What a container's process may keep: the host's bounding set, less `withheld` unless
    the container is privileged (asks for CAP_SYS_ADMIN)."""
    asked = set((process.get("capabilities") or {}).get("bounding") or [])
    return bounding if "CAP_SYS_ADMIN" in asked else bounding - withheld


def rewrite(path: str, in_bundle: bool) -> None:
    with open(path) as f:
        doc = json.load(f)
    process = doc["process"] if in_bundle else doc
    removed = filter_process(process, allowed_for(process, bounding_set(), withheld()))
    if removed:
        tmp = path + ".capfilter"
        with open(tmp, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, path)


def option(argv: list[str], *names: str) -> str | None:
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def main(argv: list[str]) -> None:
    runc = os.environ.get("RTRACE_RUNC", "/usr/sbin/runc")
    commands = [a for a in argv if not a.startswith("-")]
    if "create" in argv or "run" in argv:
        bundle = option(argv, "--bundle", "-b") or os.getcwd()
        rewrite(os.path.join(bundle, "config.json"), in_bundle=True)
    elif commands and "exec" in argv:
        process = option(argv, "--process", "-p")
        if process:
            rewrite(process, in_bundle=False)
    os.execv(runc, [runc, *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
