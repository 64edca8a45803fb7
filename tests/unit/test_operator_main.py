"""`retransmit-operator` refuses to start with one line that names the problem."""

from __future__ import annotations

import pytest

from retransmit_operator.main import main

pytestmark = pytest.mark.unit


def test_bad_setting_exits_2_naming_the_variable(monkeypatch, capsys):
    monkeypatch.setenv("RTRACE_AGENT_SECURITY_MODE", "root")
    assert main([]) == 2
    assert "RTRACE_AGENT_SECURITY_MODE='root'" in capsys.readouterr().err


def test_missing_kubeconfig_exits_2_with_the_fix(tmp_path, capsys):
    assert main(["--kubeconfig", str(tmp_path / "absent"), "--metrics-port", "0"]) == 2
    err = capsys.readouterr().err
    assert "no Kubernetes credentials" in err and "--kubeconfig" in err
