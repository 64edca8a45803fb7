#!/usr/bin/env bash
# The local stand-in for docker.io/library/debian:bookworm-slim, which `make image` builds
# on because no registry is reachable here: a debootstrap root filesystem, slimmed as
# Debian's own -slim images are, as a tarball for `podman import`.
#
#   bash tests/harness/image_base.sh ARCH OUT.tar      (make image-base; ARCH amd64 or arm64)
#
# The packages come from THIS HOST's apt sources, and the root filesystem gets the same
# Debian entries (bookworm, -updates, -security as the host has them), so `apt-get` in the
# Dockerfile uses them too: no mirror host is written in the tree. A foreign ARCH (arm64 on
# an amd64 host) needs qemu-user emulation registered with binfmt_misc (Debian's
# qemu-user-static does that): debootstrap's second stage runs the arm64 programs.
set -euo pipefail

ARCH=${1:?usage: image_base.sh ARCH OUT.tar}
OUT=${2:?usage: image_base.sh ARCH OUT.tar}
SUITE=bookworm          # the Dockerfile's FROM docker.io/library/debian:bookworm-slim

# The host's Debian package indexes: "URI RELEASE COMPONENT", one a line, as apt uses them.
targets=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(COMPONENT)' \
            'Created-By: Packages' 'Origin: Debian' | sort -u)
mirror=$(awk -v s="$SUITE" '$2 == s && $3 == "main" {print $1; exit}' <<<"$targets")
if [ -z "$mirror" ]; then
  echo "image_base: the host's apt sources have no Debian '$SUITE main' (apt-get indextargets" \
       "lists none): add one to /etc/apt/sources.list.d/ and run apt-get update" >&2
  exit 1
fi

root=$OUT.rootfs
rm -rf "$root"
trap 'rm -rf "$root"' EXIT
if [ "$ARCH" != "$(dpkg --print-architecture)" ] && ! grep -qs '^enabled' /proc/sys/fs/binfmt_misc/qemu-"$(
     case $ARCH in arm64) echo aarch64;; *) echo "$ARCH";; esac)"; then
  echo "image_base: $ARCH programs cannot run here: install qemu-user-static (binfmt_misc)" >&2
  exit 1
fi
debootstrap --variant=minbase --arch="$ARCH" "$SUITE" "$root" "$mirror" >/dev/null

# apt sources: the host's Debian entries, one stanza per repository.
rm -f "$root/etc/apt/sources.list"
awk -v s="$SUITE" '$2 ~ "^" s {suites[$1] = suites[$1] (index(" " suites[$1] " ", " " $2 " ") ? "" : " " $2)
                                comps[$1] = comps[$1] (index(" " comps[$1] " ", " " $3 " ") ? "" : " " $3)}
     END {for (u in suites) printf "Types: deb\nURIs: %s\nSuites:%s\nComponents:%s\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n", u, suites[u], comps[u]}' \
  <<<"$targets" > "$root/etc/apt/sources.list.d/debian.sources"

# Slim as Debian's -slim images: no documentation, manual pages or translations, now or
# from later installs; apt's caches cleaned after each install; no package lists.
cat > "$root/etc/dpkg/dpkg.cfg.d/slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
cat > "$root/etc/apt/apt.conf.d/slim" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";
Acquire::Languages "none";
APT::AutoRemove::SuggestsImportant "false";
EOF
find "$root/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$root"/usr/share/{man,groff,info,lintian,linda}/* "$root"/var/cache/apt/*.bin \
       "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/*.log \
       "$root"/var/cache/debconf/*-old "$root"/var/lib/dpkg/*-old
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +

tar --numeric-owner -C "$root" -cf "$OUT.tmp" . && mv "$OUT.tmp" "$OUT"
echo "image_base: $OUT ($ARCH, packages from $mirror)"
