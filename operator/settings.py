"""The operator's configuration: one pydantic-settings model, read once from the environment.

Each field is read from RTRACE_<FIELD> (KUBECONFIG for `kubeconfig`): these names are a
contract with the Helm chart and manifests/ (the operator Deployment sets them); keep them
stable. The fields' defaults and bounds are the only definition of those facts: the chart's
values.yaml and values.schema.json are tested against them (tests/unit/test_chart_values.py).

`Settings(...)` is exactly its arguments (tests and the embedded operator inject them);
`Settings.from_env()` is the one place the environment is read. A value the operator cannot
use raises SettingsError naming the variable, the value and the fix.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
from typing import Annotated, Any, Literal, Mapping, Optional, get_args

from pydantic import AliasGenerator, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from retransmit_core.api import Toleration, parse_duration
from retransmit_core.naming import DEFAULT_NAMESPACE
from retransmit_core.validation import format_error

from .placement import TOLERATE_EVERYTHING
from retransmit_core.contract import DEFAULT_METRICS_PORT, METRICS_PORT_SPAN

ENV_PREFIX = "RTRACE_"

# auto: capabilities where the node's own agent can load BPF with them, privileged elsewhere
# (operator/privilege.py); the other two apply to every node.
SecurityMode = Literal["auto", "privileged", "capabilities"]
PullPolicy = Literal["Always", "IfNotPresent", "Never"]
LOG_LEVELS: tuple[str, ...] = ("DEBUG", "INFO", "WARNING", "ERROR")

# Agents use the host network, so each running trace's agents get a port of their own in
# [base, base + span) (slots.choose_port): the highest base whose highest port, base + span - 1,
# is still a port. The span is also the most traces that can run at once.
AGENT_METRICS_PORT_MIN = 1024
AGENT_METRICS_PORT_MAX = 65535 - (METRICS_PORT_SPAN - 1)
MIN_SYNC_INTERVAL = 0.1

DEFAULT_AGENT_RESOURCES: dict[str, Any] = {
    # bcc compiles the program with clang at start-up: CPU and memory peak there, not while
    # counting. The CPU limit bounds what the DaemonSet can take from every node; once the
    # program is loaded the kernel counts, so a throttled agent only reports later.
    "requests": {"cpu": "50m", "memory": "128Mi"},
    "limits": {"cpu": "1", "memory": "512Mi"},
}
RESOURCE_KEYS = ("requests", "limits", "claims")
RESOURCES_EXAMPLE = '\'{"requests":{"cpu":"50m","memory":"128Mi"}}\''
TOLERATIONS_EXAMPLE = '\'[{"operator":"Exists"}]\''
NODE_SELECTOR_EXAMPLE = '\'{"pool":"blue"}\''
DEFAULT_MAX_RUNNING_TRACES = 10


class SettingsError(ValueError):
    """An environment variable has a value the operator cannot use; the message names it."""


class Settings(BaseSettings):
    # Each field's variable is its validation alias: RTRACE_ + the name in capitals, unless
    # the field names its own (kubeconfig). Fields are still set by name in Python.
    model_config = SettingsConfigDict(alias_generator=AliasGenerator(validation_alias=lambda name: ENV_PREFIX + name.upper()),
                                      case_sensitive=True, frozen=True, extra="forbid", populate_by_name=True)

    namespace: str = Field(DEFAULT_NAMESPACE, min_length=1,
                           description="Namespace the operator runs in; agents' DaemonSets go there.")
    agent_image: str = Field("retransmit-agent:0.1.0", min_length=1, description="Image of the agent container (the Dockerfile's `agent` target).")
    agent_image_pull_policy: PullPolicy = Field("IfNotPresent", description="The agent container's imagePullPolicy.")
    agent_service_account: str = Field("retransmit-agent", min_length=1, description="ServiceAccount of the agent pods.")
    agent_security_mode: SecurityMode = Field(
        "auto", description="How agent pods may load BPF: auto (capabilities, privileged only on the nodes whose "
                            "agent found capabilities not enough), privileged or capabilities (see render.py).")
    agent_resources: Annotated[dict[str, Any], NoDecode] = Field(
        default_factory=lambda: json.loads(json.dumps(DEFAULT_AGENT_RESOURCES)),
        description="The agent container's resources; JSON in the environment.")
    agent_command: Annotated[tuple[str, ...], NoDecode] = Field(
        ("retransmit-agent",), min_length=1,
        description="The agent container's command; in the environment split like a shell would.")
    agent_metrics_port: int = Field(
        DEFAULT_METRICS_PORT, ge=AGENT_METRICS_PORT_MIN, le=AGENT_METRICS_PORT_MAX,
        description=f"Base port of the agents' /metrics, /readyz and /livez; each running trace gets a free "
                    f"port of its own below base + {METRICS_PORT_SPAN}, because agents use the host network "
                    f"and traces share nodes.")
    agent_tolerations: Annotated[tuple[dict[str, Any], ...], NoDecode] = Field(
        TOLERATE_EVERYTHING,
        description="Tolerations of agents whose trace sets none (a trace's spec.tolerations replace them); "
                    "JSON in the environment. Default: every taint, so a trace reaches every Linux node.")
    agent_node_selector: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description="nodeSelector of agents whose trace sets none (a trace's spec.nodeSelector replaces it); "
                    "JSON in the environment. kubernetes.io/os=linux is always added.")
    agent_priority_class_name: Optional[str] = Field(
        None, description="priorityClassName of the agent pods (e.g. system-node-critical), so they are not "
                          "the first evicted from a full node.")
    max_running_traces: int = Field(
        DEFAULT_MAX_RUNNING_TRACES, ge=1, le=METRICS_PORT_SPAN,
        description=f"How many traces may run at once in the cluster (at most {METRICS_PORT_SPAN}, the agents' "
                    f"port span); the next one waits Pending and names the running ones.")
    metrics_port: int = Field(8080, ge=0, le=65535, description="The operator's /metrics, /healthz, /readyz; 0 disables.")
    sync_interval: float = Field(2.0, description="How often each trace is aggregated and checked for completion; "
                                                  "a Go-style duration in the environment.")
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR.")
    kubeconfig: Optional[str] = Field(None, validation_alias="KUBECONFIG",
                                      description="kubeconfig outside a cluster (--kubeconfig wins); in a pod "
                                                  "the service account is used.")

    @field_validator("agent_resources", mode="before")
    @classmethod
    def _resources_from_json(cls, value: Any) -> Any:
        value = _from_json(value, f"e.g. {RESOURCES_EXAMPLE}")
        if not isinstance(value, dict) or set(value) - set(RESOURCE_KEYS):
            raise ValueError(f"must be an object with requests and/or limits, e.g. {RESOURCES_EXAMPLE}")
        return value

    @field_validator("agent_tolerations", mode="before")
    @classmethod
    def _tolerations_from_json(cls, value: Any) -> Any:
        value = _from_json(value, f"a list of tolerations, e.g. {TOLERATIONS_EXAMPLE}")
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"must be a list of tolerations, e.g. {TOLERATIONS_EXAMPLE}")
        for i, item in enumerate(value):
            try:
                Toleration.model_validate(item)
            except ValidationError as e:
                raise ValueError(format_error(e, root=f"[{i}]")) from None
        return tuple(value)

    @field_validator("agent_node_selector", mode="before")
    @classmethod
    def _node_selector_from_json(cls, value: Any) -> Any:
        value = _from_json(value, f"an object of labels, e.g. {NODE_SELECTOR_EXAMPLE}")
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise ValueError(f"must be an object of label keys and values, e.g. {NODE_SELECTOR_EXAMPLE}")
        return value

    @field_validator("agent_command", mode="before")
    @classmethod
    def _command_from_shell_words(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        try:
            words = tuple(shlex.split(value))
        except ValueError as e:
            raise ValueError(f"not shell words ({e}): quote as a shell would, e.g. '/venv/bin/python -m retransmit_agent'") from None
        if not words:
            raise ValueError("no command: give one, e.g. 'retransmit-agent', or leave the variable unset")
        return words

    @field_validator("sync_interval", mode="before")
    @classmethod
    def _interval_from_duration(cls, value: Any) -> Any:
        seconds = parse_duration(value) if isinstance(value, str) else value
        if isinstance(seconds, (int, float)) and seconds < MIN_SYNC_INTERVAL:
            raise ValueError(f"below {MIN_SYNC_INTERVAL * 1000:.0f}ms: use e.g. '2s'")
        return seconds

    @field_validator("log_level", mode="before")
    @classmethod
    def _known_log_level(cls, value: Any) -> Any:
        level = value.upper() if isinstance(value, str) else value
        if not isinstance(level, str) or not isinstance(logging.getLevelName(level), int):
            raise ValueError(f"use {', '.join(LOG_LEVELS[:-1])} or {LOG_LEVELS[-1]}")
        return level

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   **_others: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only the arguments: from_env is the one reader of the environment, so a test or an
        # embedded operator never picks up an RTRACE_* variable from the shell that runs it.
        return (init_settings,)

    @classmethod
    def env_name(cls, field: str) -> str:
        """The environment variable of a field: RTRACE_AGENT_IMAGE for agent_image."""
        return str(cls.model_fields[field].validation_alias)

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None, **overrides: Any) -> "Settings":
        """Settings from `env` (default os.environ); keyword overrides win (CLI flags)."""
        # Keyed by field name, as the overrides are: both present, the override wins.
        values = {_field_of(cls, key): value for key, value in _Environment(cls, os.environ if env is None else env)().items()}
        try:
            return cls(**{**values, **overrides})
        except ValidationError as e:
            raise SettingsError("; ".join(_message(cls, error, overrides) for error in e.errors())) from None


def _from_json(value: Any, what: str) -> Any:
    """A JSON variable's value parsed (other values as they are); the error says what to give."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e}): give {what}") from None


class _Environment(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping (os.environ in the pod).
    An empty variable counts as unset, as Kubernetes renders an optional value left empty."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self.env_vars = {name: value for name, value in env.items() if value != ""}


def _field_of(cls: type[Settings], key: Any) -> str:
    for name, info in cls.model_fields.items():
        if key in (name, info.validation_alias):
            return name
    return str(key)


def _message(cls: type[Settings], error: Any, overrides: Mapping[str, Any]) -> str:
    """One validation error as a person fixes it: the variable (or the override), the value, the fix."""
    field = _field_of(cls, error["loc"][0]) if error["loc"] else ""
    source = field if field in overrides else cls.env_name(field) if field in cls.model_fields else field
    value = error.get("input")
    kind = error["type"]
    if kind in ("int_parsing", "int_from_float", "int_type"):
        return f"{source}={value!r} is not an integer"
    if kind in ("greater_than_equal", "less_than_equal"):
        bounds = {type(m).__name__: m for m in cls.model_fields[field].metadata}
        return f"{source}={value} is out of range: use {bounds['Ge'].ge}-{bounds['Le'].le}"
    if kind == "literal_error":
        allowed = get_args(cls.model_fields[field].annotation)
        return f"{source}={value!r}: use one of {', '.join(allowed)}"
    if kind == "value_error":
        reason = str(error["ctx"]["error"])
        return f"{source}: {reason}" if repr(value) in reason else f"{source}={value!r}: {reason}"
    if kind == "extra_forbidden":
        return f"{source}: not a setting"
    return f"{source}={value!r}: {error['msg']}"
