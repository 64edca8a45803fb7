#!/usr/bin/env bash
# Set-up for the second-kernel test layer: Debian's own 6.1 kernel booted by virtme-ng.
#
#   bash tests/harness/kernelvm_setup.sh [CACHE]     (make kernel-vm)
#
# Installs, only when missing:
#   apt   linux-image-6.1.0-<N>-amd64 with N taken from the installed linux-headers-*-amd64
#         (the headers `make setup` links for bcc; the guest reuses them through the host's
#         /lib/modules/<release>/build link), qemu-system-x86, busybox-static
#         (virtme-ng builds its initramfs from it), all with --no-install-recommends;
#   PyPI  virtme-ng in a venv at $CACHE/virtme-ng (command vng; its bin/ must be on PATH
#         when vng runs, because vng starts virtme-run from there).
# A second run does nothing but checks. tests/harness/kernelvm.py finds the kernel the same
# way (the newest /boot/vmlinuz-6.1.*-amd64 that has headers).
set -euo pipefail

CACHE=${1:-${RTRACE_CACHE:-$HOME/.cache/retransmit-operator}}
VENV=$CACHE/virtme-ng
VIRTME_NG_VERSION=1.42

installed() { dpkg-query -W -f='${Status}\n' "$1" 2>/dev/null | grep -q 'install ok installed'; }

# The headers' ABI number N (linux-headers-6.1.0-N-amd64): the image must be the same build,
# so that /lib/modules/<release>/build (headers for bcc) and the kernel agree.
headers=$(dpkg-query -W -f='${Package} ${Status}\n' 'linux-headers-6.1.*-amd64' 2>/dev/null \
          | awk '/install ok installed/ {print $1}' | sort -V | tail -1)
if [ -z "$headers" ]; then
  echo "kernelvm_setup: no linux-headers-6.1.*-amd64 installed: run 'make setup' first" >&2
  exit 1
fi
release=${headers#linux-headers-}                  # 6.1.0-N-amd64
packages=("linux-image-$release" qemu-system-x86 busybox-static)

missing=()
for p in "${packages[@]}"; do installed "$p" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo ">> apt-get install ${missing[*]}"
  # Lock timeout: other worktrees on this machine may be installing at the same time.
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    --no-install-recommends "${missing[@]}" >/dev/null
else
  echo ">> ${packages[*]} present"
fi
test -r "/boot/vmlinuz-$release" || { echo "kernelvm_setup: /boot/vmlinuz-$release missing after install" >&2; exit 1; }
test -e "/lib/modules/$release/build/include" || { echo "kernelvm_setup: no headers at /lib/modules/$release/build" >&2; exit 1; }

if "$VENV/bin/vng" --version >/dev/null 2>&1 && test -x "$VENV/bin/virtme-run"; then
  echo ">> virtme-ng present ($("$VENV/bin/vng" --version 2>&1 | tail -1))"
else
  echo ">> virtme-ng $VIRTME_NG_VERSION into $VENV"
  mkdir -p "$CACHE"
  # cd /: a checkout's operator/ folder must never shadow the standard library (see Makefile).
  (cd / && /usr/bin/python3 -m venv "$VENV" \
     && "$VENV/bin/pip" install -q "virtme-ng==$VIRTME_NG_VERSION")
fi

echo ">> second kernel: /boot/vmlinuz-$release, vng in $VENV/bin"
