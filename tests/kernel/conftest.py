"""Fixtures for kernel tests: a private loss namespace per test, one reference counter per session."""

from __future__ import annotations

import os

import pytest

from tests.harness.netns import LossNamespace
from tests.harness.refcount import ReferenceCounter


@pytest.fixture(scope="session", autouse=True)
def _root() -> None:
    # Kernel tests need root; fail loudly rather than skip (make test runs as root).
    assert os.geteuid() == 0, "kernel tests load BPF programs and create namespaces: run them as root"


@pytest.fixture(scope="session")
def reference():
    """The independent counter, attached before any load of the session and detached after."""
    with ReferenceCounter() as ref:
        yield ref


@pytest.fixture
def ns():
    with LossNamespace() as namespace:
        yield namespace
