#!/usr/bin/env bash
# Builds etcd, kube-apiserver, kube-controller-manager and kube-scheduler from the Go
# module proxy into $CACHE/k8s-<version>/ (outside the clone, so a fresh clone on the
# same machine reuses them), plus kubelet and a tiny static `pause` (the real node's sandbox
# image, pause/main.go) for tests/harness/realnode.py. Idempotent: only missing binaries
# are built; when all are there it does nothing.
#   usage: build.sh CACHE_DIR        (prints the binaries' folder on its last line)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${1:?usage: build.sh CACHE_DIR}
go=${GO:-$(command -v go || echo /usr/local/go/bin/go)}

k8s_version=$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ {print $2}' "$here/go.mod")
etcd_version=$(awk '$1 == "go.etcd.io/etcd/server/v3" && $2 ~ /^v/ {print $2}' "$here/go.mod")
dest="$cache/k8s-$k8s_version"
binaries=(etcd kube-apiserver kube-controller-manager kube-scheduler)
# Built separately (added later: caches made before them get only these two built).
node_binaries=(kubelet pause)

have_control_plane() {
  for b in "${binaries[@]}"; do [ -x "$dest/$b" ] || return 1; done
  [ -f "$dest/.complete" ]
}
have_all() {
  for b in "${node_binaries[@]}"; do [ -x "$dest/$b" ] || return 1; done
  have_control_plane
}

if have_all; then
  echo ">> control plane, kubelet and pause present in $dest (kubernetes $k8s_version, etcd $etcd_version)"
  exit 0
fi

if [ ! -x "$go" ]; then
  echo "ERROR: no Go toolchain found (looked for 'go' on PATH and /usr/local/go/bin/go)." >&2
  echo "       Install Go >= 1.24 to build the control plane for the cluster tests." >&2
  exit 1
fi

mkdir -p "$cache"
# One build at a time per machine: a second make waits and then finds the binaries.
exec 9>"$cache/k8s-$k8s_version.lock"
flock 9
if have_all; then
  echo ">> control plane, kubelet and pause present in $dest (built by a concurrent run)"
  exit 0
fi

export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0

echo ">> checking the Go module proxy ($("$go" env GOPROXY)) for k8s.io/kubernetes@$k8s_version"
if ! out=$(cd "$here" && timeout 120 "$go" mod download -json "k8s.io/kubernetes@$k8s_version" 2>&1); then
  echo "ERROR: cannot fetch k8s.io/kubernetes@$k8s_version from the Go module proxy." >&2
  echo "       The cluster tests need the proxy (GOPROXY=$("$go" env GOPROXY)) once per machine;" >&2
  echo "       afterwards the binaries are cached in $dest." >&2
  echo "$out" | tail -5 >&2
  exit 1
fi

echo ">> downloading modules for kubernetes $k8s_version and etcd $etcd_version"
(cd "$here" && "$go" mod download)

tmp=$(mktemp -d "$cache/.k8s-build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
# The version the binaries report (/version, kubectl version): what Kubernetes' own build sets.
minor=${k8s_version#v1.}; minor=${minor%%.*}
vpkg=k8s.io/component-base/version
ldflags="-s -w -X $vpkg.gitVersion=$k8s_version -X $vpkg.gitMajor=1 -X $vpkg.gitMinor=$minor"
ldflags+=" -X $vpkg.gitTreeState=clean -X $vpkg.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
start=$(date +%s)
if ! have_control_plane; then
echo ">> building ${binaries[*]} (cold: many minutes on 2 cores; the Go build cache keeps later builds fast)"
(cd "$here" && "$go" build -trimpath -ldflags="$ldflags" -o "$tmp/" \
  go.etcd.io/etcd/server/v3 \
  k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler)
# The etcd main package is go.etcd.io/etcd/server/v3, which go names "server".
mv "$tmp/server" "$tmp/etcd"
mkdir -p "$dest"
for b in "${binaries[@]}"; do mv "$tmp/$b" "$dest/$b"; done
echo "kubernetes $k8s_version etcd $etcd_version" > "$dest/.complete"
echo ">> built ${binaries[*]} into $dest in $(( $(date +%s) - start ))s"
fi

# kubelet for the real node (tests/harness/realnode.py), and its sandbox ("pause") program:
# static (CGO_ENABLED=0), so the image made of it needs nothing else.
for b in "${node_binaries[@]}"; do
  [ -x "$dest/$b" ] && continue
  start=$(date +%s)
  case $b in
    kubelet) pkg=k8s.io/kubernetes/cmd/kubelet ;;
    pause) pkg=./pause ;;
  esac
  echo ">> building $b ($pkg)"
  (cd "$here" && "$go" build -trimpath -ldflags="$ldflags" -o "$tmp/$b" "$pkg")
  mkdir -p "$dest"
  mv "$tmp/$b" "$dest/$b"
  echo ">> built $b into $dest in $(( $(date +%s) - start ))s"
done
