"""Run a command as root inside one of Debian's own kernels (12's 6.1, 11's 5.10), booted by virtme-ng.

    result = run_in_vm(".venv/bin/python -m tests.harness.vm_scenarios --out {rwdir}/result.json",
                       rwdir=tmp_path, kernel="5.10", timeout=900)
    result.returncode, result.output, result.rwdir, result.release

`make kernel-vm` (tests/harness/kernelvm_setup.sh) installs the 6.1 image, fetches the 5.10
one into the cache (its modules into /lib/modules), and installs qemu, busybox-static and
virtme-ng. The guest sees the host's whole file system read-only over 9p (so this checkout,
its .venv and Debian's bcc work unchanged inside) and can write only to `rwdir`. One call =
one boot; vng exits with the command's exit status.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
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
    release: str      # the booted kernel's release, e.g. 5.10.0-32-amd64
    seconds: float    # wall time of the boot, command and power-off


# The kernels `make kernel-vm` provides, by version: where their images are. Debian 12's 6.1
# is an installed package; Debian 11's 5.10 is only extracted into the cache (no dpkg entry).
IMAGES = {
    "6.1": (Path("/boot"), "vmlinuz-6.1.*-amd64"),
    "5.10": (CACHE / "debian-5.10", "*/boot/vmlinuz-5.10.*-amd64"),
}
KERNELS = tuple(IMAGES)


def _version_key(image: Path) -> list:
    return [int(x) if x.isdigit() else x for x in image.name.replace("-", ".").split(".")]


def kernel_image(kernel: str = "6.1") -> Path:
    """The newest image of `kernel` (one of KERNELS) that can boot and compile here: its modules
    indexed in /lib/modules (vng loads 9p and virtio from there) and headers at its build link.

    The same rule kernelvm_setup.sh installs by (for 6.1: image ABI number = headers ABI number).
    """
    if kernel not in IMAGES:
        raise VMError(f"kernel {kernel!r}: not one of {', '.join(KERNELS)}")
    folder, pattern = IMAGES[kernel]
    images = sorted(folder.glob(pattern), key=_version_key)
    modules = [Path("/lib/modules") / release_of(p) for p in images]
    usable = [p for p, m in zip(images, modules) if (m / "modules.dep").is_file() and (m / "build" / "include").is_dir()]
    if not usable:
        raise VMError(f"no {folder}/{pattern} with modules and headers in /lib/modules "
                      f"(found {[p.name for p in images]}): run `make kernel-vm`")
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


def run_in_vm(command: str, rwdir: Path, kernel: str = "6.1", timeout: float = 900.0, memory: str = "1G",
              cpus: int = 2) -> VMResult:
    """Boot `kernel` (one of KERNELS), run `command` (a shell line; `{rwdir}` is replaced) as root
    in the checkout's folder, power off. Raises VMError when vng cannot start or exceeds `timeout`."""
    image = kernel_image(kernel)
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
    started = time.monotonic()
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise VMError(f"the {release_of(image)} VM did not finish within {timeout:.0f}s; output:\n{output[-4000:]}") from None
    return VMResult(proc.returncode, output, rwdir, release_of(image), round(time.monotonic() - started, 1))
