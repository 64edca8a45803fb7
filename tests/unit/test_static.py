"""Static checks that catch what unit tests of pure functions miss (an undefined name in an
I/O path only a cluster test reaches broke the agent once)."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def test_pyflakes_finds_nothing_in_the_code_and_its_tests():
    result = subprocess.run([sys.executable, "-m", "pyflakes", "core", "agent", "operator", "plugin", "bpf", "bench", "helm", "tests"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
