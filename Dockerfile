# Two images, one multi-stage build:
#   --target operator   retransmit-operator: the kopf operator (Deployment; non-root user
#                       65532). Python and the operator's own dependencies only: no bcc,
#                       clang or kernel headers. The default target.
#   --target agent      retransmit-agent: the bcc agent (DaemonSet rendered by the operator;
#                       runs as root, privileged or with BPF+PERFMON+SYS_RESOURCE, set by
#                       the pod), with generic kernel headers of its architecture.
# Build: `docker build --target agent -t retransmit-agent .` (amd64 or arm64: the headers
# follow TARGETARCH), or `make image` (podman, base from the host's apt sources; see the
# Makefile).
#
# BASE_IMAGE: every stage's base; `make image` passes a local import of the same Debian
# release (no registry is reachable there).
ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim

# checkov:skip=CKV_DOCKER_2: No HEALTHCHECK: Kubernetes ignores it; the operator Deployment has probes and the agent serves /metrics and readiness to its DaemonSet.
# checkov:skip=CKV_DOCKER_7: The base is the build argument BASE_IMAGE, by default debian:bookworm-slim (a versioned tag); `make image` passes a local import of that release.

# ---- generic kernel headers (agent) --------------------------------------------------
# bcc compiles the agent's tracepoint program on the node, against kernel headers. Nodes
# without headers (RHCOS, most managed node images) get these generic ones: the program
# reads only tracepoint fields (bcc takes their layout from tracefs), so headers of another
# kernel version are enough. Debian splits them into -common (sources) and -<arch>
# (generated files); bcc's BCC_KERNEL_SOURCE takes ONE folder, so both are merged here,
# keeping only the target architecture's arch/ folder.
# Unpacked with dpkg-deb rather than installed: the package depends on gcc and kbuild,
# which bcc does not need (it compiles with its own clang).
FROM ${BASE_IMAGE} AS headers
# Set by docker buildx and podman/buildah; a builder that sets none gets the stage's own.
ARG TARGETARCH
RUN arch=${TARGETARCH:-$(dpkg --print-architecture)} \
 && case "$arch" in amd64) kernel_arch=x86 ;; arm64) kernel_arch=arm64 ;; \
      *) echo "no generic kernel headers for $arch: the agent image is built for amd64 and arm64" >&2; exit 1 ;; esac \
 && apt-get update \
 && cd /tmp \
 && pkg=$(apt-cache depends --no-recommends "linux-headers-$arch" | awk '/Depends: linux-headers-/ {print $2; exit}') \
 && common=$(apt-cache depends --no-recommends "$pkg" | awk '/Depends: linux-headers-.*-common/ {print $2; exit}') \
 && apt-get download "$pkg" "$common" \
 && for deb in ./*.deb; do dpkg-deb -x "$deb" /tmp/x; done \
 && mkdir -p /out/kernel-headers \
 && cp -a /tmp/x/usr/src/linux-headers-*-common/. /out/kernel-headers/ \
 && cp -a /tmp/x/usr/src/"$pkg"/. /out/kernel-headers/ \
 && rm -rf /out/kernel-headers/scripts /out/kernel-headers/tools \
 && find /out/kernel-headers/arch -mindepth 1 -maxdepth 1 ! -name "$kernel_arch" -exec rm -rf {} + \
 && echo "$pkg" > /out/kernel-headers/DEBIAN-PACKAGE \
 && rm -rf /var/lib/apt/lists/*

# ---- the project's wheel (both images) -----------------------------------------------
# Built once; each image installs it. PIP_CERT: a CA bundle for builds behind a
# TLS-intercepting proxy (the Makefile passes the host's); empty means pip's own.
FROM ${BASE_IMAGE} AS wheel
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
ARG PIP_CERT=""
COPY pyproject.toml /tmp/build/pyproject.toml
RUN cd / \
 && python3 -m venv /opt/build \
 && python3 -c 'import tomllib; print("\n".join(tomllib.load(open("/tmp/build/pyproject.toml", "rb"))["build-system"]["requires"]))' > /tmp/build-requires.txt \
 && /opt/build/bin/pip install --no-cache-dir --disable-pip-version-check -q ${PIP_CERT:+--cert "$PIP_CERT"} -r /tmp/build-requires.txt
COPY . /tmp/build/
RUN cd / && /opt/build/bin/pip wheel --no-cache-dir --disable-pip-version-check -q --no-deps --no-build-isolation -w /wheels /tmp/build

# ---- the agent's Python environment --------------------------------------------------
# python3-bpfcc brings bcc and its clang. The venv sees Debian's site-packages so that
# `import bcc` works (bcc is not on PyPI). Dependencies first, read from pyproject.toml:
# source edits do not reinstall them.
FROM ${BASE_IMAGE} AS agent
LABEL org.opencontainers.image.title="retransmit-agent" \
      org.opencontainers.image.description="Find where TCP retransmits happen in a Kubernetes cluster: the bcc agent the operator runs on each node" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv python3-bpfcc ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb

COPY --from=headers /out/kernel-headers /opt/retransmit/kernel-headers

ENV VIRTUAL_ENV=/opt/retransmit/venv \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RTRACE_KERNEL_HEADERS=/opt/retransmit/kernel-headers
ENV PATH=/usr/local/bin:$VIRTUAL_ENV/bin:/usr/sbin:/usr/bin:/sbin:/bin

# `retransmit-agent` as the pod runs it: bcc looks for headers at
# /lib/modules/$(uname -r)/build. When the node provides none there (the DaemonSet mounts
# the node's /lib/modules and /usr/src read-only when they exist, so a RHEL node with
# kernel-devel uses its exact headers), point bcc at the generic ones above. A user's own
# BCC_KERNEL_SOURCE wins. Then exec the real entry point, which becomes the process that
# receives SIGTERM.
RUN printf '%s\n' \
      '#!/bin/sh' \
      '# Image wrapper: use the node'"'"'s kernel headers when present, else the generic ones.' \
      'if [ -z "${BCC_KERNEL_SOURCE:-}" ] && [ ! -d "/lib/modules/$(uname -r)/build/include" ]; then' \
      '  export BCC_KERNEL_SOURCE="$RTRACE_KERNEL_HEADERS"' \
      'fi' \
      'exec "$VIRTUAL_ENV/bin/retransmit-agent" "$@"' \
      > /usr/local/bin/retransmit-agent \
 && chmod 0755 /usr/local/bin/retransmit-agent

ARG PIP_CERT=""
COPY pyproject.toml /tmp/pyproject.toml
RUN cd / \
 && python3 -m venv --system-site-packages "$VIRTUAL_ENV" \
 && python3 -c 'import tomllib; print("\n".join(tomllib.load(open("/tmp/pyproject.toml", "rb"))["project"]["dependencies"]))' > /tmp/requirements.txt \
 && "$VIRTUAL_ENV/bin/pip" install --no-cache-dir --disable-pip-version-check -q ${PIP_CERT:+--cert "$PIP_CERT"} -r /tmp/requirements.txt \
 && rm /tmp/pyproject.toml /tmp/requirements.txt

COPY --from=wheel /wheels /tmp/wheels
RUN cd / \
 && "$VIRTUAL_ENV/bin/pip" install --no-cache-dir --disable-pip-version-check -q --no-index --no-deps /tmp/wheels/*.whl \
 && rm -rf /tmp/wheels \
 && "$VIRTUAL_ENV/bin/python" -c 'import bcc, kopf, retransmit_core, retransmit_agent.cli, retransmit_plugin, retransmit_bpf'

# The image's default user is the unprivileged 65532; the agent's pod sets runAsUser: 0.
USER 65532:65532
WORKDIR /
ENTRYPOINT []
CMD ["retransmit-agent"]

# ---- the operator's root filesystem ---------------------------------------------------
# A venv with only the dependencies pyproject.toml names in [tool.retransmit-operator]
# operator-dependencies (versions from [project] dependencies), then the project without
# the agent's, the plugin's and the BPF program's packages. Left out: pip and setuptools
# (nothing is installed at run time), tests, kubernetes.aio (the asyncio client, 40 MB,
# which the operator never imports). Bytecode is kept only for what the operator imports
# at start (the check at the end compiles it).
# Then /out, the whole root filesystem of the operator image, as distroless images are
# made: Debian's Python interpreter and standard library, the shared libraries they and
# the venv's extension modules link (as ldd finds them), a passwd entry for its user.
# No shell, no package manager: it runs one program.
FROM ${BASE_IMAGE} AS operator-root
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
ARG PIP_CERT=""
COPY pyproject.toml /tmp/pyproject.toml
RUN cd / \
 && python3 -m venv /opt/retransmit/venv \
 && python3 -c 'import re, tomllib; p = tomllib.load(open("/tmp/pyproject.toml", "rb")); names = {n.lower() for n in p["tool"]["retransmit-operator"]["operator-dependencies"]}; print("\n".join(d for d in p["project"]["dependencies"] if re.match(r"[A-Za-z0-9._-]+", d).group().lower() in names))' > /tmp/requirements.txt \
 && /opt/retransmit/venv/bin/pip install --no-cache-dir --disable-pip-version-check -q ${PIP_CERT:+--cert "$PIP_CERT"} -r /tmp/requirements.txt
COPY --from=wheel /wheels /tmp/wheels
RUN cd / \
 && venv=/opt/retransmit/venv \
 && "$venv/bin/pip" install --no-cache-dir --disable-pip-version-check -q --no-index --no-deps /tmp/wheels/*.whl \
 && site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
 && rm -rf "$site"/retransmit_agent "$site"/retransmit_plugin "$site"/retransmit_bpf "$site"/kubernetes/aio \
      "$venv"/bin/retransmit-agent "$venv"/bin/kubectl-retransmit "$venv"/bin/kubectl_complete-retransmit \
 && "$venv/bin/pip" uninstall -y -q --disable-pip-version-check pip setuptools \
 && find "$venv" -depth \( -name __pycache__ -o -name tests -o -name test \) -type d -exec rm -rf {} + \
 && rm -f "$venv"/bin/activate* "$venv"/bin/Activate.ps1 \
 && "$venv/bin/python" -c 'import kopf, retransmit_core, retransmit_operator.main' \
 && ! "$venv/bin/python" -c 'import retransmit_agent' 2>/dev/null
RUN set -eu \
 && out=/out && mkdir -p "$out/etc" "$out/tmp" && chmod 1777 "$out/tmp" \
 && for d in bin sbin lib lib64; do if [ -L "/$d" ]; then cp -P "/$d" "$out/$d" && mkdir -p "$out/$(readlink "/$d")"; fi; done \
 && py=$(readlink -f /usr/bin/python3) && stdlib=/usr/lib/$(basename "$py") \
 && cp -a --parents "$py" /usr/bin/python3 "$stdlib" /etc/$(basename "$py") /opt/retransmit/venv "$out/" \
 && rm -rf "$out$stdlib"/test "$out$stdlib"/ensurepip "$out$stdlib"/venv "$out$stdlib"/pydoc_data \
      "$out$stdlib"/idlelib "$out$stdlib"/tkinter "$out$stdlib"/turtledemo "$out$stdlib"/lib2to3 \
 && find "$py" "$stdlib/lib-dynload" /opt/retransmit/venv -type f \( -name '*.so' -o -name '*.so.*' -o -path "$py" \) \
      -exec ldd {} + 2>/dev/null \
    | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// && $2 ~ /^\(/ {print $1}' | sort -u \
    | while read -r lib; do cp -L --parents "$lib" "$out/"; done \
 && printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > "$out/etc/passwd" \
 && printf 'root:x:0:\nnonroot:x:65532:\n' > "$out/etc/group"

# ---- operator (the default target) ---------------------------------------------------
FROM scratch AS operator
LABEL org.opencontainers.image.title="retransmit-operator" \
      org.opencontainers.image.description="Find where TCP retransmits happen in a Kubernetes cluster: the kopf operator" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=operator-root /out/ /
ENV VIRTUAL_ENV=/opt/retransmit/venv \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LANG=C.UTF-8
ENV PATH=$VIRTUAL_ENV/bin:/usr/bin
# The operator's user (distroless "nonroot" id).
USER 65532:65532
WORKDIR /
ENTRYPOINT []
CMD ["retransmit-operator"]
