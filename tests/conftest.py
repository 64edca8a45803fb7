"""Fixtures shared by every test layer that needs a real cluster (cluster, deploy).

Session fixtures start only when a test asks for them, so `pytest -m unit` never builds or
starts anything.

control_plane (session)
    A `tests.harness.controlplane.ControlPlane`: etcd, kube-apiserver, kube-controller-manager
    and kube-scheduler on 127.0.0.1 with RBAC on. Attributes and helpers:
      .kubeconfig                 admin kubeconfig file (system:masters) -- for kubectl/helm:
                                  `env=control_plane.env()` sets KUBECONFIG
      .server, .ca_file           https://127.0.0.1:<port> and its CA
      .api_client()               new kubernetes.client.ApiClient as admin
      .api_client(token=TOKEN)    ... acting as whoever TOKEN belongs to (RBAC applies)
      .service_account_token(ns, name)      TokenRequest (creates the ServiceAccount if missing)
      .kubeconfig_for_token(token, path)    a kubeconfig file for a token
      .workdir                    certificates and <component>.log of each process
      .component(name)            .proc (Popen) and .log of etcd / kube-apiserver / ...
      with .paused("kube-apiserver"): ...   SIGSTOP for the block (an API outage), SIGCONT after
    Needs `make k8s-binaries` once per machine (make test does it).

node_simulator (session)
    A `tests.harness.nodesim.NodeSimulator` playing kubelet for nodes node-a and node-b
    (labels kubernetes.io/os=linux, kubernetes.io/hostname=<name>, rtrace.dev/simulated=true).
    Pods bound to them run their command+args as local root processes; non-hostNetwork pods
    get their own netns with IPv4+IPv6 from 198.18.0.0/15 and fd00::/8; each pod's process
    gets $KUBECONFIG with a token of its own ServiceAccount. Helpers:
      .log_path(namespace, pod, container=None)   the container's stdout+stderr
      .pod_dir(namespace, pod)                    kubeconfig, serviceaccount/, logs
      .pids(namespace, pod), .netns(namespace, pod), .nodes (SimNode: name, ip_v4, pod_cidr_v4...)
    Containers without `command` run `node_simulator.image_entrypoints[image]`: a test may
    set an entry (e.g. the project image -> ["retransmit-agent"]).

kube_proxy (module)
    A `tests.harness.kubeproxy.KubeProxy`: the real kube-proxy (nftables mode) routing
    Services (ClusterIPs, NodePorts on the nodes' addresses, both families) between
    node_simulator's pods on different nodes. One per machine at a time (its nftables tables
    have fixed names): a second session waits for the first's to end. Module-scoped: it
    runs only while the module that asks for it runs, and its teardown fails when the host
    is not as before (no `kube-proxy` tables, forwarding and bridge settings restored). What
    it changes on the host, and how that is undone: the module's docstring and
    docs/development.md.

kube (function)
    An admin ApiClient, closed after the test.

namespace (function)
    A fresh namespace name (created, deleted after the test); its `default` ServiceAccount
    exists before the test starts, so pods can be created at once.

Set RTRACE_KEEP_CLUSTER=1 to keep the temp dirs (logs) after the session.
"""

from __future__ import annotations

import uuid

import pytest

from tests.harness.controlplane import ControlPlane, wait_until


@pytest.fixture(scope="session")
def control_plane():
    with ControlPlane() as cp:
        yield cp


@pytest.fixture(scope="session")
def node_simulator(control_plane):
    from tests.harness.nodesim import NodeSimulator

    with NodeSimulator(control_plane.kubeconfig, ("node-a", "node-b")) as sim:
        yield sim


@pytest.fixture(scope="module")
def kube_proxy(control_plane, node_simulator):
    from tests.harness.kubeproxy import KubeProxy, simulator_network

    with KubeProxy(control_plane.kubeconfig, simulator_network(node_simulator),
                   workdir=node_simulator.state_dir) as proxy:
        yield proxy


@pytest.fixture
def kube(control_plane):
    api = control_plane.api_client()
    yield api
    api.close()


@pytest.fixture
def namespace(control_plane):
    import kubernetes

    name = f"t-{uuid.uuid4().hex[:8]}"
    with control_plane.api_client() as api:
        core = kubernetes.client.CoreV1Api(api)
        core.create_namespace({"metadata": {"name": name}})
        wait_until(lambda: core.read_namespaced_service_account("default", name),
                   f"ServiceAccount {name}/default")
        yield name
        core.delete_namespace(name)
