#!/usr/bin/env bash
# Writes a build module pinned to one Kubernetes release: go.mod (k8s.io/kubernetes at
# VERSION, and every k8s.io staging module its own go.mod points at ./staging replaced by
# the published v0.<minor>.<patch>), tools.go (the commands to build) and go.sum (go mod
# tidy). Used to add a version (DIR = v1.<minor>/ beside this script) or move a pin.
#   usage: pin.sh VERSION DIR        e.g. pin.sh v1.30.14 tests/harness/k8sbuild/v1.30
# The control plane only: kubelet and pause are built from the default module (this folder).
set -euo pipefail

version=${1:?usage: pin.sh VERSION DIR}
dir=${2:?usage: pin.sh VERSION DIR}
go=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
staging=v0.${version#v1.}

mkdir -p "$dir"
kmod=$(cd "$dir" && GOFLAGS=-mod=mod "$go" mod download -json "k8s.io/kubernetes@$version" |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["GoMod"])')
{
  echo "// Builds the control plane of Kubernetes $version (see ../go.mod for why the"
  echo "// k8s.io staging modules are replaced). Written by ../pin.sh; change the pin with it."
  echo "module retransmit.dev/k8sbuild/${dir##*/}"
  echo
  echo "go $(awk '$1 == "go" {print $2; exit}' "$kmod")"
  echo
  echo "require k8s.io/kubernetes $version"
  echo
  echo "replace ("
  awk -v v="$staging" '$2 == "=>" && $3 ~ /^\.\/staging\// {printf "\t%s => %s %s\n", $1, $1, v}' "$kmod"
  echo ")"
} > "$dir/go.mod"
cat > "$dir/tools.go" <<'GO'
//go:build tools

// Package k8sbuild only records which commands the build compiles, so that
// `go mod tidy` keeps their dependencies.
package k8sbuild

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
)
GO
(cd "$dir" && GOFLAGS=-mod=mod "$go" mod tidy)
