"""The operator's own check of a trace: whatever got past the CRD schema stops here.

The schema refuses most bad input at `kubectl apply`; what it cannot express (the full IPv6
syntax, label-key syntax in maps, objects stored before a stricter schema) is caught by the
same pydantic models, and the message names the field, the value and the fix.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import ValidationError

from .api import MAX_TRACE_NAME_LENGTH, RetransmitTraceSpec


def _path(loc: tuple[Any, ...]) -> str:
    out = "spec"
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def format_error(error: ValidationError) -> str:
    """'spec.filter.remoteCIDRs[0]: '1:::2/64' is not a CIDR: ...' for each problem, joined by '; '."""
    problems = []
    for item in error.errors():
        loc = tuple(item.get("loc", ()))
        message = item.get("msg", "invalid")
        if message.startswith("Value error, "):
            message = message[len("Value error, "):]
        last = str(loc[-1]) if loc else ""
        if loc and message.startswith(f"{last}["):
            # The model's message already starts with the field and index: "remoteCIDRs[1]: ..."
            problems.append(f"{_path(loc[:-1])}.{message}")
        elif message.startswith("["):
            problems.append(f"{_path(loc)}{message}")
        else:
            shown = item.get("input")
            quiet = item.get("type") in ("missing", "value_error") or isinstance(shown, (dict, list))
            suffix = "" if quiet else f" (got {shown!r})"
            problems.append(f"{_path(loc)}: {message}{suffix}")
    return "; ".join(problems)


def validate_trace(name: str, spec: Optional[dict[str, Any]]) -> tuple[Optional[RetransmitTraceSpec], Optional[str]]:
    """(spec, None) when the trace can run, else (None, a message naming the field and the fix)."""
    if len(name) > MAX_TRACE_NAME_LENGTH:
        return None, (f"metadata.name: {name!r} has {len(name)} characters, at most {MAX_TRACE_NAME_LENGTH} "
                      "fit the agents' DaemonSet name rtrace-<name>: recreate the trace with a shorter name")
    try:
        return RetransmitTraceSpec.model_validate(spec or {}), None
    except ValidationError as e:
        return None, format_error(e)
