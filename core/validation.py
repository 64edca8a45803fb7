"""The operator's own check of a trace: whatever got past the CRD schema stops here.

The schema refuses most bad input at `kubectl apply`; what it cannot express (the full IPv6
syntax, label-key syntax in maps, objects stored before a stricter schema) is caught by the
same pydantic models, and the message names the field, the value and the fix.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from pydantic import ValidationError

from .api import DNS_LABEL_PATTERN, GO_DURATION_PATTERN, MAX_TRACE_NAME_LENGTH, RetransmitTraceSpec


def _path(loc: tuple[Any, ...], root: str = "spec") -> str:
    out = root
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def shown(value: Any) -> str:
    """A value as a person wrote it in YAML: strings quoted, null, true/false, numbers."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"'{value}'"
    return str(value)


# pydantic's wording in Kubernetes terms, by error type (its own "Input should be ..." is kept
# for bounds, which read well, without the word Input).
_KINDS = {
    "dict_type": "should be an object (key: value)", "model_type": "should be an object (key: value)",
    "model_attributes_type": "should be an object (key: value)",
    "list_type": "should be a list", "int_type": "should be a whole number", "int_parsing": "should be a whole number",
    "int_from_float": "should be a whole number", "string_type": "should be a string",
    "bool_type": "should be true or false", "bool_parsing": "should be true or false",
    "float_type": "should be a number", "float_parsing": "should be a number",
    "missing": "is required",
    "extra_forbidden": "is not a field here: remove it or fix its spelling (kubectl explain rtrace.spec lists the fields)",
}


# A pattern means nothing to a reader: what it stands for, and the fix.
_PATTERNS = {
    GO_DURATION_PATTERN: "is not a duration: use a number and a unit (ms, s, m, h), e.g. '90s' or '1m30s'",
    DNS_LABEL_PATTERN: "is not a namespace name: use lowercase letters, digits and '-', starting and ending "
                       "with a letter or digit",
}


def _problem(item: dict[str, Any]) -> str:
    kind = item.get("type", "")
    ctx = item.get("ctx") or {}
    if kind in _KINDS:
        return _KINDS[kind]
    if kind in ("literal_error", "enum"):
        return f"should be {str(ctx.get('expected', '')).replace(chr(39), '')}"
    if kind == "string_pattern_mismatch" and ctx.get("pattern") in _PATTERNS:
        return f"{shown(item.get('input'))} {_PATTERNS[ctx['pattern']]}"
    message = str(item.get("msg", "is invalid"))
    if message.startswith("Value error, "):
        return message[len("Value error, "):]
    return message.replace("Input should", "should", 1).replace("String should", "should", 1)


def format_error(error: ValidationError, root: str = "spec") -> str:
    """'spec.filter.remoteCIDRs[0]: '1:::2/64' is not a CIDR: ...' for each problem, joined by
    '; ': the field path as kubectl explain names it, the value as written, what to use instead."""
    problems = []
    for item in error.errors():
        loc = tuple(item.get("loc", ()))
        message = _problem(item)
        last = str(loc[-1]) if loc else ""
        if loc and message.startswith(f"{last}["):
            # The model's message already starts with the field and index: "remoteCIDRs[1]: ..."
            problems.append(f"{_path(loc[:-1], root)}.{message}")
        elif message.startswith("["):
            problems.append(f"{_path(loc, root)}{message}")
        else:
            value = item.get("input")
            quiet = (item.get("type") in ("missing", "value_error", "extra_forbidden")
                     or isinstance(value, (dict, list)) or (item.get("ctx") or {}).get("pattern") in _PATTERNS)
            suffix = "" if quiet else f" (got {shown(value)})"
            problems.append(f"{_path(loc, root)}: {message}{suffix}")
    return "; ".join(problems)


def validate_trace(name: str, spec: Optional[dict[str, Any]]) -> tuple[Optional[RetransmitTraceSpec], Optional[str]]:
    """(spec, None) when the trace can run, else (None, a message naming the field and the fix)."""
    if len(name) > MAX_TRACE_NAME_LENGTH:
        return None, (f"metadata.name: {name!r} has {len(name)} characters, at most {MAX_TRACE_NAME_LENGTH} "
                      "fit the agents' DaemonSet name (rtrace- and the trace's name): recreate the trace with a shorter name")
    if not re.fullmatch(DNS_LABEL_PATTERN, name):
        # Stored before the CRD refused dots: its reports' names could collide with another's.
        return None, (f"metadata.name: {name!r} is not a DNS label (lowercase letters, digits and '-', no dots): "
                      "each node's report is named <trace>.<node>, so a dot could make two traces share one; "
                      "recreate the trace under a name without dots")
    try:
        return RetransmitTraceSpec.model_validate(spec or {}), None
    except ValidationError as e:
        return None, format_error(e)
