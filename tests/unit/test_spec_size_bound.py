"""The whole spec travels to the agents as one argument (core/contract.py). The largest spec
the CRD's schema admits must fit in one argument with room to spare, or agents of a big
but valid trace crash-loop with E2BIG (32 matchExpressions x 64 values x 63 characters once
did). Computed from the generated schema itself: every list, map and string in it must be
bounded, or this test names the one that is not."""

from __future__ import annotations

import json
from typing import Any

import pytest

from retransmit_core.api import RetransmitTraceSpec
from retransmit_core.contract import MAX_ARGUMENT_BYTES, AgentInvocation, render_agent_args
from retransmit_operator.crd import openapi_schema

pytestmark = pytest.mark.unit

LABEL_KEY_MAX = 317   # prefix (253) + "/" + name (63): the longest label key


def largest(schema: dict[str, Any], path: str = "spec") -> Any:
    """The instance of `schema` whose JSON is longest (validity beyond size aside)."""
    if "enum" in schema:
        return max(schema["enum"], key=lambda value: len(json.dumps(value)))
    kind = schema.get("type")
    if kind == "object":
        out = {key: largest(sub, f"{path}.{key}") for key, sub in (schema.get("properties") or {}).items()}
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            assert "maxProperties" in schema, f"{path}: a map without maxProperties"
            for i in range(schema["maxProperties"]):
                out[str(i).rjust(LABEL_KEY_MAX, "k")] = largest(extra, f"{path}[*]")
        return out
    if kind == "array":
        assert "maxItems" in schema, f"{path}: a list without maxItems"
        return [largest(schema["items"], f"{path}[]") for _ in range(schema["maxItems"])]
    if kind == "string":
        assert "maxLength" in schema, f"{path}: a string without maxLength"
        return "x" * schema["maxLength"]
    if kind == "integer":
        return schema.get("maximum", 2 ** 63)
    if kind == "boolean":
        return False
    raise AssertionError(f"{path}: a type this bound does not know: {schema}")


def test_the_largest_spec_the_schema_admits_fits_one_argument_with_room():
    spec = largest(openapi_schema()["properties"]["spec"])
    argument = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    # An upper bound (patterns ignored), kept under three quarters of the limit: a field added
    # later must not take the last of the room unnoticed.
    assert len(argument.encode()) < MAX_ARGUMENT_BYTES * 3 / 4, f"{len(argument)} bytes"


def test_a_spec_at_the_list_bounds_is_valid_and_renders_to_an_argument_within_the_limit():
    values = [f"v{i}" * 20 for i in range(16)]
    spec = RetransmitTraceSpec.model_validate({
        "podSelector": {"matchExpressions": [{"key": f"example.com/key-{i}", "operator": "In", "values": values}
                                             for i in range(16)]},
        "tolerations": [{"key": f"example.com/taint-{i}", "operator": "Exists"} for i in range(16)],
        "namespaces": [f"namespace-{i}".ljust(63, "n") for i in range(256)],
    })
    args = render_agent_args(AgentInvocation(trace="big", spec=spec))
    assert max(len(a.encode()) for a in args) < MAX_ARGUMENT_BYTES


def test_beyond_the_bounds_is_refused_with_the_limit():
    with pytest.raises(ValueError) as refused:
        RetransmitTraceSpec.model_validate({"podSelector": {"matchExpressions": [
            {"key": "k", "operator": "In", "values": [str(i) for i in range(17)]}]}})
    assert "at most 16 items" in str(refused.value)
