#!/usr/bin/env bash
# Set-up for the VM kernel layer: Debian's own 6.1 and 5.10 kernels booted by virtme-ng.
#
#   bash tests/harness/kernelvm_setup.sh [CACHE]     (make kernel-vm)
#
# Installs, only when missing:
#   apt   linux-image-6.1.0-<N>-amd64 with N taken from the installed linux-headers-*-amd64
#         (the headers `make setup` links for bcc; the guest reuses them through the host's
#         /lib/modules/<release>/build link), qemu-system-x86, busybox-static
#         (virtme-ng builds its initramfs from it), all with --no-install-recommends;
#   PyPI  virtme-ng in a venv at $CACHE/virtme-ng (command vng; its bin/ must be on PATH
#         when vng runs, because vng starts virtme-run from there);
#   5.10  Debian 11's linux-image-5.10.0-<N>-amd64-unsigned, the newest N in bullseye,
#         downloaded (not installed: dpkg never sees it) from the mirror the host's own apt
#         sources name, through a throwaway apt configuration under $CACHE/debian-5.10/apt;
#         extracted to $CACHE/debian-5.10/<release>/ (boot/ kept), its modules moved to
#         /lib/modules/<release> and indexed by depmod (vng loads 9p and virtio from there).
#         There are no 5.10 headers: /lib/modules/<release>/build and source link 6.1's,
#         so bcc in that guest compiles against them (the program reads only tracepoint
#         fields, laid out by the guest's own format files).
# A second run does nothing but checks. tests/harness/kernelvm.py finds the kernels the same
# way (the newest /boot/vmlinuz-6.1.*-amd64 that has headers; the newest extracted 5.10
# whose modules are indexed).
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

# ---- Debian 11's 5.10 -------------------------------------------------------------------
OLD=$CACHE/debian-5.10
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# The newest extracted 5.10 whose modules are installed and indexed ("" when none).
old_release() {
  local image rel best=""
  for image in "$OLD"/*/boot/vmlinuz-5.10.*-amd64; do
    [ -r "$image" ] || continue
    rel=${image##*/vmlinuz-}
    [ -s "/lib/modules/$rel/modules.dep" ] && best=$(printf '%s\n%s\n' "$best" "$rel" | sed '/^$/d' | sort -V | tail -1)
  done
  echo "$best"
}

mkdir -p "$OLD"
# One set-up at a time: other worktrees on this machine may run `make kernel-vm` too.
exec 9>"$OLD.lock"
flock 9
old=$(old_release)
if [ -n "$old" ]; then
  echo ">> Debian 11 kernel present: $OLD/$old (modules in /lib/modules/$old)"
else
  mirror=$(/usr/bin/python3 "$HERE/debian_mirror.py")
  apt_dir=$OLD/apt
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/sources.list.d"
  echo "deb $mirror bullseye main" > "$apt_dir/sources.list"
  : > "$apt_dir/status"
  # Every piece of state apt would touch points into $apt_dir: the host's own sources,
  # lists, package cache and dpkg status stay as they were. Root's sandbox user (_apt)
  # cannot enter $HOME/.cache, hence APT::Sandbox::User=root.
  apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=$apt_dir/sources.list.d"
            -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache"
            -o "Dir::State::status=$apt_dir/status" -o "APT::Sandbox::User=root")
  echo ">> apt-get update (bullseye main from $mirror, lists in $apt_dir)"
  apt-get "${apt_opts[@]}" update -qq
  package=$(apt-cache "${apt_opts[@]}" pkgnames linux-image-5.10.0- \
            | grep -E '^linux-image-5\.10\.0-[0-9]+-amd64-unsigned$' | sort -V | tail -1 || true)
  if [ -z "$package" ]; then
    echo "kernelvm_setup: bullseye on $mirror lists no linux-image-5.10.0-<N>-amd64-unsigned" >&2
    exit 1
  fi
  rel=${package#linux-image-}; rel=${rel%-unsigned}    # 5.10.0-N-amd64
  echo ">> apt-get download $package"
  (cd "$apt_dir/cache/archives" && rm -f "${package}"_*.deb && apt-get "${apt_opts[@]}" download "$package")
  deb=$(ls "$apt_dir/cache/archives/${package}"_*.deb | sort -V | tail -1)
  rm -rf "$OLD/$rel.partial"
  dpkg-deb -x "$deb" "$OLD/$rel.partial"
  rm -rf "${OLD:?}/$rel" && mv "$OLD/$rel.partial" "$OLD/$rel"
  # bullseye is not usr-merged: the package ships lib/modules/<release>.
  rm -rf "/lib/modules/$rel.partial" && cp -a "$OLD/$rel/lib/modules/$rel" "/lib/modules/$rel.partial"
  rm -rf "/lib/modules/$rel" && mv "/lib/modules/$rel.partial" "/lib/modules/$rel"
  depmod "$rel"
  # Keep only boot/ (vmlinuz, config) in the cache: the modules live in /lib/modules.
  rm -rf "${OLD:?}/$rel/lib" "${OLD:?}/$rel/usr" "$deb"
  old=$(old_release)
  [ "$old" = "$rel" ] || { echo "kernelvm_setup: $OLD/$rel/boot/vmlinuz-$rel or its modules missing after extraction" >&2; exit 1; }
  echo ">> Debian 11 kernel: $OLD/$old (modules in /lib/modules/$old)"
fi

# No 5.10 headers exist on this host: bcc in that guest compiles against 6.1's, linked as
# `make kernel-headers` links them for the host's own kernel (build -> the -amd64 folder,
# source -> -common). BCC_KERNEL_SOURCE cannot stand in: bcc takes it as one unified tree,
# and Debian splits its headers in two.
headers_dir=/usr/src/$headers                       # linux-headers-6.1.0-N-amd64
ln -sfn "$headers_dir" "/lib/modules/$old/build"
ln -sfn "${headers_dir%-amd64}-common" "/lib/modules/$old/source"
test -e "/lib/modules/$old/build/include" -a -e "/lib/modules/$old/source/include" \
  || { echo "kernelvm_setup: $headers_dir or its -common folder is missing" >&2; exit 1; }

echo ">> VM kernels: /boot/vmlinuz-$release and $OLD/$old/boot/vmlinuz-$old, vng in $VENV/bin"
