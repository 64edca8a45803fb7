#!/usr/bin/env bash
# Builds etcd, kube-apiserver, kube-controller-manager and kube-scheduler from the Go module
# proxy, for every Kubernetes release pinned here, into $CACHE/k8s-<version>/ (outside the
# clone, so a fresh clone on the same machine reuses them):
#   - the default release, from go.mod beside this script, plus kubelet and a tiny static
#     `pause` (the real node's sandbox image, pause/main.go) for tests/harness/realnode.py,
#     and kube-proxy, which routes Services for the simulated nodes (tests/harness/kubeproxy.py);
#   - each older release the chart supports, from its own module v1.<minor>/go.mod (written
#     by pin.sh), with the etcd that release pins.
# These go.mod files are the one list of versions (tests/harness/controlplane.py reads the
# same). Idempotent: only missing binaries are built; when all are there it does nothing.
#   usage: build.sh CACHE_DIR
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${1:?usage: build.sh CACHE_DIR}
go=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
binaries=(etcd kube-apiserver kube-controller-manager kube-scheduler)
# Built from the default module only (added later: caches made before them get only these built).
node_binaries=(kubelet pause kube-proxy)

pinned() {   # pinned MODULE_DIR GO_MODULE: the version go.mod requires
  awk -v m="$2" '$1 == m && $2 ~ /^v/ {print $2}' "$1/go.mod"
}

# have DEST BINARY...: all of them built, and the control plane's build finished.
have() {
  local dest=$1; shift
  for b in "${binaries[@]}" "$@"; do [ -x "$dest/$b" ] || return 1; done
  [ -f "$dest/.complete" ]
}

# build_release MODULE_DIR [EXTRA_BINARY...]: one release's control plane, then the extras.
build_release() {
  local module=$1; shift
  local k8s_version etcd_version dest tmp minor vpkg ldflags start b pkg
  k8s_version=$(pinned "$module" k8s.io/kubernetes)
  etcd_version=$(pinned "$module" go.etcd.io/etcd/server/v3)
  dest="$cache/k8s-$k8s_version"
  if have "$dest" "$@"; then
    echo ">> ${binaries[*]}${*:+ $*} present in $dest (kubernetes $k8s_version, etcd $etcd_version)"
    return 0
  fi
  if [ ! -x "$go" ]; then
    echo "ERROR: no Go toolchain found (looked for 'go' on PATH and /usr/local/go/bin/go)." >&2
    echo "       Install Go >= 1.24 to build the control plane for the cluster tests." >&2
    exit 1
  fi

  mkdir -p "$cache"
  # One build per version at a time on a machine: a second make waits, then finds the binaries.
  exec 9>"$cache/k8s-$k8s_version.lock"
  flock 9
  if have "$dest" "$@"; then
    echo ">> ${binaries[*]}${*:+ $*} present in $dest (built by a concurrent run)"
    exec 9>&-
    return 0
  fi

  echo ">> checking the Go module proxy ($("$go" env GOPROXY)) for k8s.io/kubernetes@$k8s_version"
  local out
  if ! out=$(cd "$module" && timeout 120 "$go" mod download -json "k8s.io/kubernetes@$k8s_version" 2>&1); then
    echo "ERROR: cannot fetch k8s.io/kubernetes@$k8s_version from the Go module proxy." >&2
    echo "       The cluster tests need the proxy (GOPROXY=$("$go" env GOPROXY)) once per machine;" >&2
    echo "       afterwards the binaries are cached in $dest." >&2
    echo "$out" | tail -5 >&2
    exit 1
  fi
  echo ">> downloading modules for kubernetes $k8s_version and etcd $etcd_version"
  (cd "$module" && "$go" mod download)

  tmp=$(mktemp -d "$cache/.k8s-build.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  # The version the binaries report (/version, kubectl version): what Kubernetes' own build sets.
  minor=${k8s_version#v1.}; minor=${minor%%.*}
  vpkg=k8s.io/component-base/version
  ldflags="-s -w -X $vpkg.gitVersion=$k8s_version -X $vpkg.gitMajor=1 -X $vpkg.gitMinor=$minor"
  ldflags+=" -X $vpkg.gitTreeState=clean -X $vpkg.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  if ! have "$dest"; then
    start=$(date +%s)
    echo ">> building ${binaries[*]} $k8s_version (cold: many minutes on 2 cores; the Go build cache keeps later builds fast)"
    (cd "$module" && "$go" build -trimpath -ldflags="$ldflags" -o "$tmp/" \
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
  for b in "$@"; do
    [ -x "$dest/$b" ] && continue
    start=$(date +%s)
    case $b in
      kubelet) pkg=k8s.io/kubernetes/cmd/kubelet ;;
      kube-proxy) pkg=k8s.io/kubernetes/cmd/kube-proxy ;;
      pause) pkg=./pause ;;
    esac
    echo ">> building $b ($pkg)"
    (cd "$module" && "$go" build -trimpath -ldflags="$ldflags" -o "$tmp/$b" "$pkg")
    mkdir -p "$dest"
    mv "$tmp/$b" "$dest/$b"
    echo ">> built $b into $dest in $(( $(date +%s) - start ))s"
  done
  rm -rf "$tmp"
  trap - EXIT
  exec 9>&-
}

export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0
build_release "$here" "${node_binaries[@]}"
for module in "$here"/v1.*/; do
  build_release "${module%/}"
done
