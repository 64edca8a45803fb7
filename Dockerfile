# One image for both halves of retransmit-operator:
#   retransmit-operator  the kopf operator (Deployment; runs as the image's non-root user)
#   retransmit-agent     the bcc agent (DaemonSet rendered by the operator; runs as root,
#                        privileged or with BPF+PERFMON+SYS_RESOURCE, set by the pod)
# Build locally: `make image` (podman, base from debootstrap; see the Makefile).
#
# checkov:skip=CKV_DOCKER_2: No HEALTHCHECK: Kubernetes ignores it; the operator Deployment has probes and the agent serves /metrics and readiness to its DaemonSet.

# ---- generic kernel headers ----------------------------------------------------------
# bcc compiles the agent's tracepoint program on the node, against kernel headers. Nodes
# without headers (RHCOS, most managed node images) get these generic ones: the program
# reads only tracepoint fields (bcc takes their layout from tracefs), so headers of another
# kernel version are enough. Debian splits them into -common (sources) and -amd64
# (generated files); bcc's BCC_KERNEL_SOURCE takes ONE folder, so both are merged here.
# Unpacked with dpkg-deb rather than installed: the package depends on gcc and kbuild,
# which bcc does not need (it compiles with its own clang).
FROM docker.io/library/debian:bookworm-slim AS headers
RUN apt-get update \
 && cd /tmp \
 && arch=$(apt-cache depends --no-recommends linux-headers-amd64 | awk '/Depends: linux-headers-/ {print $2; exit}') \
 && common=$(apt-cache depends --no-recommends "$arch" | awk '/Depends: linux-headers-.*-common/ {print $2; exit}') \
 && apt-get download "$arch" "$common" \
 && for deb in ./*.deb; do dpkg-deb -x "$deb" /tmp/x; done \
 && mkdir -p /out/kernel-headers \
 && cp -a /tmp/x/usr/src/linux-headers-*-common/. /out/kernel-headers/ \
 && cp -a /tmp/x/usr/src/"$arch"/. /out/kernel-headers/ \
 && rm -rf /out/kernel-headers/scripts /out/kernel-headers/tools \
 && find /out/kernel-headers/arch -mindepth 1 -maxdepth 1 ! -name x86 -exec rm -rf {} + \
 && echo "$arch" > /out/kernel-headers/DEBIAN-PACKAGE

# ---- runtime -------------------------------------------------------------------------
FROM docker.io/library/debian:bookworm-slim

LABEL org.opencontainers.image.title="retransmit-operator" \
      org.opencontainers.image.description="Find where TCP retransmits happen in a Kubernetes cluster: kopf operator + bcc agent" \
      org.opencontainers.image.licenses="Apache-2.0"

# python3-bpfcc brings bcc and its clang; python3-venv builds the venv below.
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

# The venv sees Debian's site-packages so `import bcc` works (bcc is not on PyPI).
# Dependencies (and the build backend) first, read from pyproject.toml: source edits do not
# reinstall them. PIP_CERT: a CA bundle for builds behind a TLS-intercepting proxy (the
# Makefile passes the host's); empty means pip's own.
ARG PIP_CERT=""
COPY pyproject.toml /tmp/build/pyproject.toml
RUN cd / \
 && python3 -m venv --system-site-packages "$VIRTUAL_ENV" \
 && python3 -c 'import tomllib; p = tomllib.load(open("/tmp/build/pyproject.toml", "rb")); print("\n".join(p["project"]["dependencies"] + p["build-system"]["requires"]))' > /tmp/build/requirements.txt \
 && "$VIRTUAL_ENV/bin/pip" install --no-cache-dir --disable-pip-version-check -q ${PIP_CERT:+--cert "$PIP_CERT"} -r /tmp/build/requirements.txt

COPY . /tmp/build/
RUN cd / \
 && "$VIRTUAL_ENV/bin/pip" install --no-cache-dir --disable-pip-version-check -q --no-index --no-build-isolation --no-deps /tmp/build \
 && rm -rf /tmp/build \
 && "$VIRTUAL_ENV/bin/python" -c 'import bcc, kopf, retransmit_core, retransmit_operator, retransmit_agent, retransmit_plugin, retransmit_bpf'

# The operator's user (distroless "nonroot" id). The agent's pod sets runAsUser: 0.
USER 65532:65532
WORKDIR /
ENTRYPOINT []
CMD ["retransmit-operator"]
