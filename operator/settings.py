"""The operator's configuration, read once from the environment.

These variable names are a contract with the Helm chart and manifests/ (the operator
Deployment sets them); keep them stable.

    RTRACE_NAMESPACE                 namespace the operator runs in; agents' DaemonSets go there
                                     [retransmit-system]
    RTRACE_AGENT_IMAGE               image of the agent container [retransmit-operator:0.1.0]
    RTRACE_AGENT_IMAGE_PULL_POLICY   Always | IfNotPresent | Never [IfNotPresent]
    RTRACE_AGENT_SERVICE_ACCOUNT     ServiceAccount of the agent pods [retransmit-agent]
    RTRACE_AGENT_SECURITY_MODE       privileged | capabilities [privileged] (see render.py)
    RTRACE_AGENT_RESOURCES           the agent container's resources as JSON
                                     [{"requests":{"cpu":"50m","memory":"128Mi"},"limits":{"memory":"512Mi"}}]
    RTRACE_AGENT_COMMAND             the agent container's command, split like a shell would
                                     [retransmit-agent]
    RTRACE_AGENT_METRICS_PORT        base port of the agents' /metrics, /readyz, /livez; each trace
                                     gets base + a stable offset below 100 from its name, because
                                     agents use the host network and two traces share nodes [9464]
    RTRACE_METRICS_PORT              the operator's /metrics, /healthz, /readyz; 0 disables [8080]
    RTRACE_SYNC_INTERVAL             how often each trace is aggregated and checked for completion
                                     (Go-style duration) [2s]
    RTRACE_LOG_LEVEL                 DEBUG | INFO | WARNING | ERROR [INFO]
    KUBECONFIG                       kubeconfig to use outside a cluster (--kubeconfig wins);
                                     in a pod the service account is used
"""

from __future__ import annotations

import json
import logging
import os
import shlex
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Mapping, Optional

from .api import parse_duration
from .contract import DEFAULT_METRICS_PORT

SecurityMode = Literal["privileged", "capabilities"]
SECURITY_MODES: tuple[str, ...] = ("privileged", "capabilities")
PULL_POLICIES: tuple[str, ...] = ("Always", "IfNotPresent", "Never")

DEFAULT_AGENT_RESOURCES: dict[str, Any] = {
    # bcc compiles the program with clang at start-up: memory peaks there, not while counting.
    "requests": {"cpu": "50m", "memory": "128Mi"},
    "limits": {"memory": "512Mi"},
}


class SettingsError(ValueError):
    """An environment variable has a value the operator cannot use; the message names it."""


@dataclass(frozen=True)
class Settings:
    namespace: str = "retransmit-system"
    agent_image: str = "retransmit-operator:0.1.0"
    agent_image_pull_policy: str = "IfNotPresent"
    agent_service_account: str = "retransmit-agent"
    agent_security_mode: SecurityMode = "privileged"
    agent_resources: dict[str, Any] = field(default_factory=lambda: json.loads(json.dumps(DEFAULT_AGENT_RESOURCES)))
    agent_command: tuple[str, ...] = ("retransmit-agent",)
    agent_metrics_port: int = DEFAULT_METRICS_PORT
    metrics_port: int = 8080
    sync_interval: float = 2.0
    log_level: str = "INFO"
    kubeconfig: Optional[str] = None

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None, **overrides: Any) -> "Settings":
        """Settings from `env` (default os.environ); keyword overrides win (tests, CLI flags)."""
        env = os.environ if env is None else env
        base = cls()

        def get(name: str) -> Optional[str]:
            value = env.get(name)
            return value if value not in (None, "") else None

        def integer(name: str, default: int, low: int, high: int) -> int:
            text = get(name)
            if text is None:
                return default
            try:
                value = int(text)
            except ValueError:
                raise SettingsError(f"{name}={text!r} is not an integer") from None
            if not low <= value <= high:
                raise SettingsError(f"{name}={value} is out of range: use {low}-{high}")
            return value

        def choice(name: str, default: str, allowed: tuple[str, ...]) -> str:
            value = get(name) or default
            if value not in allowed:
                raise SettingsError(f"{name}={value!r}: use one of {', '.join(allowed)}")
            return value

        resources = base.agent_resources
        if get("RTRACE_AGENT_RESOURCES"):
            try:
                resources = json.loads(env["RTRACE_AGENT_RESOURCES"])
            except json.JSONDecodeError as e:
                raise SettingsError(f"RTRACE_AGENT_RESOURCES is not JSON ({e}): give e.g. "
                                    '\'{"requests":{"cpu":"50m","memory":"128Mi"}}\'') from None
            if not isinstance(resources, dict) or set(resources) - {"requests", "limits", "claims"}:
                raise SettingsError("RTRACE_AGENT_RESOURCES must be an object with requests and/or limits")

        command = tuple(shlex.split(get("RTRACE_AGENT_COMMAND") or "")) or base.agent_command

        interval_text = get("RTRACE_SYNC_INTERVAL")
        interval = base.sync_interval
        if interval_text is not None:
            try:
                interval = parse_duration(interval_text)
            except ValueError as e:
                raise SettingsError(f"RTRACE_SYNC_INTERVAL: {e}") from None
            if interval < 0.1:
                raise SettingsError(f"RTRACE_SYNC_INTERVAL={interval_text} is below 100ms")

        level = (get("RTRACE_LOG_LEVEL") or base.log_level).upper()
        if not isinstance(logging.getLevelName(level), int):
            raise SettingsError(f"RTRACE_LOG_LEVEL={level!r}: use DEBUG, INFO, WARNING or ERROR")

        settings = cls(
            namespace=get("RTRACE_NAMESPACE") or base.namespace,
            agent_image=get("RTRACE_AGENT_IMAGE") or base.agent_image,
            agent_image_pull_policy=choice("RTRACE_AGENT_IMAGE_PULL_POLICY", base.agent_image_pull_policy, PULL_POLICIES),
            agent_service_account=get("RTRACE_AGENT_SERVICE_ACCOUNT") or base.agent_service_account,
            agent_security_mode=choice("RTRACE_AGENT_SECURITY_MODE", base.agent_security_mode, SECURITY_MODES),  # type: ignore[arg-type]
            agent_resources=resources,
            agent_command=command,
            agent_metrics_port=integer("RTRACE_AGENT_METRICS_PORT", base.agent_metrics_port, 1024, 65535 - 100),
            metrics_port=integer("RTRACE_METRICS_PORT", base.metrics_port, 0, 65535),
            sync_interval=interval,
            log_level=level,
            kubeconfig=get("KUBECONFIG"),
        )
        return replace(settings, **overrides) if overrides else settings
