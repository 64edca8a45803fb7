"""Run a command as root inside Debian's own 6.1 kernel, booted by virtme-ng (a second real kernel).

    result = run_in_vm(".venv/bin/python -m tests.harness.vm_scenarios --out {rwdir}/result.json",
                       rwdir=tmp_path, timeout=900)
    result.returncode, result.output, result.rwdir

`make kernel-vm` (tests/harness/kernelvm_setup.sh) installs the kernel image, qemu,
busybox-static and virtme-ng. The guest sees the host's whole file system read-only over
9p (so this checkout, its .venv and Debian's bcc work unchanged inside) and can write only
to `rwdir`. One call = one boot; vng exits with the command's exit status.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("RTRACE_CACHE", Path.home() / ".cache" / "retransmit-operator"))
VNG_BIN = CACHE / "virtme-ng" / "bin"

# Run before the command inside the guest. virtme-ng mounts debugfs and tracefs itself
# today, but not bpffs; mount whatever is missing so the guest matches a node.
GUEST_PRELUDE = """\
mountpoint -q /sys/kernel/debug || mount -t debugfs debugfs /sys/kernel/debug
mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
"""


class VMError(RuntimeError):
    """The VM could not be started, or did not finish in time. The message says why."""


@dataclass(frozen=True)
class VMResult:
    returncode: int   # the guest command's exit status, as vng returns it
    output: str       # vng's stdout and stderr interleaved (guest command output included)
    rwdir: Path       # the folder the guest could write to


def kernel_image() -> Path:
    """The newest /boot/vmlinuz-6.1.*-amd64 whose headers are installed (bcc needs them inside).

    The same rule kernelvm_setup.sh installs by: image ABI number = headers ABI number.
    """
    images = sorted(Path("/boot").glob("vmlinuz-6.1.*-amd64"),
                    key=lambda p: [int(x) if x.isdigit() else x for x in p.name.replace("-", ".").split(".")])
    usable = [p for p in images if (Path("/lib/modules") / p.name.removeprefix("vmlinuz-") / "build" / "include").is_dir()]
    if not usable:
        raise VMError(f"no /boot/vmlinuz-6.1.*-amd64 with headers (found {[p.name for p in images]}): run `make kernel-vm`")
    return usable[-1]


def release_of(image: Path) -> str:
    return image.name.removeprefix("vmlinuz-")


def vng_command(image: Path, rwdir: Path, script: Path, memory: str, cpus: int) -> list[str]:
    vng = VNG_BIN / "vng"
    if not os.access(vng, os.X_OK):
        raise VMError(f"{vng} is missing: run `make kernel-vm`")
    return [
        str(vng),
        # /dev/kvm on this machine is a nested module (kvm_pvm) on which the 6.1 kernel
        # aborts (MSR 0x10a) or hangs after "Probing EDD": software emulation (TCG) only.
        "--disable-kvm",
        # virtiofsd is not packaged in bookworm: share the host's root over 9p.
        "--force-9p",
        # qemu's own use is ~800 MB on the host with 1G; the guest needs ~200 MB plus bcc.
        "--memory", memory,
        "--cpus", str(cpus),
        "--user", "root",
        "--rwdir", str(rwdir),
        "--cwd", str(ROOT),
        "--run", str(image),
        "--", f"sh {shlex.quote(str(script))}",
    ]


def run_in_vm(command: str, rwdir: Path, timeout: float = 900.0, memory: str = "1G", cpus: int = 2) -> VMResult:
    """Boot the 6.1 kernel, run `command` (a shell line; `{rwdir}` is replaced) as root in the
    checkout's folder, power off. Raises VMError when vng cannot start or exceeds `timeout`."""
    image = kernel_image()
    rwdir = Path(rwdir).resolve()
    rwdir.mkdir(parents=True, exist_ok=True)
    # The command goes through a script file in rwdir rather than vng's command line, so
    # no second level of shell quoting is needed.
    script = rwdir / "guest.sh"
    script.write_text("set -e\n" + GUEST_PRELUDE + f"cd {shlex.quote(str(ROOT))}\n"
                      + command.replace("{rwdir}", shlex.quote(str(rwdir))) + "\n")
    env = dict(os.environ)
    # vng starts virtme-run by name: the virtme-ng venv's bin/ must be on PATH.
    env["PATH"] = f"{VNG_BIN}{os.pathsep}{env.get('PATH', '')}"
    # Bytecode caches cannot be written on the read-only root inside; don't try.
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    try:
        # One pipe for stdout and stderr (the `2>&1 | cat` of the shell form): vng writes
        # them separately, and when both are the same regular file one clobbers the other.
        # stdin from /dev/null: with a terminal or an inherited pipe vng waits for input.
        # A session of its own, so a timeout can end vng and its qemu together.
        proc = subprocess.Popen(vng_command(image, rwdir, script, memory, cpus), cwd=ROOT, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)
    except OSError as exc:
        raise VMError(f"cannot start vng: {exc}: run `make kernel-vm`") from exc
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise VMError(f"the {release_of(image)} VM did not finish within {timeout:.0f}s; output:\n{output[-4000:]}") from None
    return VMResult(proc.returncode, output, rwdir)
