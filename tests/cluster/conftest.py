"""Cluster-layer fixtures on top of tests/conftest.py (control_plane, node_simulator, kube,
namespace): typed API handles."""

from __future__ import annotations

import os

import kubernetes
import pytest


@pytest.fixture(scope="session", autouse=True)
def _root() -> None:
    # The node simulator creates network namespaces and runs pods as root processes.
    assert os.geteuid() == 0, "cluster tests create network namespaces: run them as root"


@pytest.fixture
def core(kube):
    return kubernetes.client.CoreV1Api(kube)


@pytest.fixture
def apps(kube):
    return kubernetes.client.AppsV1Api(kube)
