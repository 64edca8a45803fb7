"""The RetransmitTrace and RetransmitNodeReport CRDs, generated from the pydantic models in
retransmit_core.api.

pydantic writes JSON Schema; Kubernetes wants a *structural* OpenAPI v3 schema: no $ref, no
anyOf/oneOf around types, no `additionalProperties: false`, no `null` types, a `type` on
every node. `structural()` turns one into the other; Kubernetes extensions
(x-kubernetes-list-type, CEL rules in x-kubernetes-validations) come from the models'
json_schema_extra. Defaults are kept under spec (the API server fills them in, so
`kubectl get -o yaml` shows the effective values) and dropped under status (status holds
exactly what its writers wrote).

    python -m retransmit_operator.crd            print the CRDs
    python -m retransmit_operator.crd --write    write manifests/crd*.yaml and the Helm chart's copies
    python -m retransmit_operator.crd --check    exit 1 when a checked-in copy differs
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any, Optional

import yaml

from retransmit_core import api
from retransmit_core.naming import APP_NAME

CRD_NAME = f"{api.PLURAL}.{api.GROUP}"
REPORT_CRD_NAME = f"{api.REPORT_PLURAL}.{api.GROUP}"
# Relative to the repository root: the trace's CRD, then the node report's.
CRD_PATHS = (Path("manifests/crd.yaml"), Path("helm/retransmit-operator/crds/retransmittraces.yaml"))
REPORT_CRD_PATHS = (Path("manifests/crd-nodereports.yaml"), Path("helm/retransmit-operator/crds/retransmitnodereports.yaml"))
HEADER = (
    "# Generated from core/api.py by `python -m retransmit_operator.crd --write` (make crd).\n"
    "# Do not edit: change the pydantic models and regenerate; a unit test fails on drift.\n"
)

# JSON Schema keywords Kubernetes does not accept (or that only carry pydantic's bookkeeping).
# propertyNames (pydantic writes it for dict[Literal[...], int] such as Flow.byCause) is no
# field of Kubernetes' JSONSchemaProps: the API server drops it on the way in, so the stored
# CRD never equals the file, and every server-side apply of the file by a second manager
# (helm install after kubectl apply) conflicts on .spec.versions. The keys are checked by
# the pydantic models on the writers' side.
_DROPPED_KEYWORDS = {"title", "$defs", "examples", "propertyNames"}


class SchemaError(ValueError):
    """The models use a JSON Schema construct a structural CRD schema cannot express."""


def structural(node: dict[str, Any], defs: dict[str, Any], *, keep_defaults: bool, path: str = "") -> dict[str, Any]:
    """A structural Kubernetes schema for one pydantic JSON Schema node (refs inlined)."""
    node = dict(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        # Keywords next to the $ref (the field's description, extras) win over the class's.
        node = {**target, **node}
    if "anyOf" in node or "oneOf" in node:
        variants = [v for v in node.pop("anyOf", None) or node.pop("oneOf") if v.get("type") != "null"]
        if len(variants) != 1:
            raise SchemaError(f"{path or '<root>'}: a union of {len(variants)} types has no structural form")
        variant = variants[0]
        if "$ref" in variant:
            variant = {**defs[variant["$ref"].rsplit("/", 1)[-1]]}
        node = {**variant, **node}  # Optional[X]: X with the field's own keywords
        if node.get("default", ...) is None:
            del node["default"]
    if "allOf" in node:
        parts = node.pop("allOf")
        if len(parts) != 1:
            raise SchemaError(f"{path}: allOf with {len(parts)} parts")
        return structural({**parts[0], **node}, defs, keep_defaults=keep_defaults, path=path)
    if "$ref" in node:  # an Optional[Model] resolved above still points at the model
        return structural(node, defs, keep_defaults=keep_defaults, path=path)

    if "const" in node:
        node["enum"] = [node.pop("const")]
    if "enum" in node and "type" not in node:
        node["type"] = "string"

    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED_KEYWORDS:
            continue
        if key == "default" and (not keep_defaults or value is None):
            continue
        if key == "additionalProperties":
            if value is False or value is True:
                continue  # unknown fields are pruned; kubectl's strict field validation reports them
            out[key] = structural(value, defs, keep_defaults=keep_defaults, path=f"{path}[*]")
        elif key == "properties":
            out[key] = {
                name: structural(sub, defs, keep_defaults=keep_defaults, path=f"{path}.{name}" if path else name)
                for name, sub in value.items()
            }
        elif key == "items":
            out[key] = structural(value, defs, keep_defaults=keep_defaults, path=f"{path}[]")
        else:
            out[key] = copy.deepcopy(value)
    if "type" not in out:
        if "properties" in out or "additionalProperties" in out:
            out["type"] = "object"
        else:
            raise SchemaError(f"{path or '<root>'}: no type (a structural schema needs one on every node)")
    if out.get("type") == "object" and "properties" in out and not out.get("required"):
        out.pop("required", None)
    # Kubernetes orders nothing, but a stable, readable order makes diffs reviewable.
    order = ["description", "type", "format", "enum", "pattern", "minimum", "maximum", "minLength", "maxLength",
             "minItems", "maxItems", "maxProperties", "default", "required"]
    return {k: out[k] for k in sorted(out, key=lambda k: (order.index(k) if k in order else len(order), k))}


def model_schema(model: type, *, keep_defaults: bool) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return structural(raw, raw.get("$defs", {}), keep_defaults=keep_defaults)


def _field_at(schema: dict[str, Any], json_path: str) -> dict[str, Any]:
    """The schema node a printer column's JSONPath points at; KeyError if the models lack it."""
    node = schema
    for part in json_path.strip(".").split("."):
        node = node["properties"][part]
    return node


def _columns(schema: dict[str, Any], columns: list[tuple[str, str, int]]) -> list[dict[str, Any]]:
    """Printer columns (name, JSONPath, priority) typed and described from the schema, then Age."""
    out = []
    for name, path, priority in columns:
        field = _field_at(schema, path)
        kind = "date" if field.get("format") == "date-time" else field["type"]
        column = {"name": name, "type": kind, "jsonPath": path, "description": field.get("description", "")}
        if priority:
            column["priority"] = priority
        out.append(column)
    out.append({"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"})
    return out


def printer_columns(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """Columns of `kubectl get rtrace`. Paths are checked against the generated schema.

    A printer column takes one JSONPath, so "Nodes" shows status.summary.nodes, a
    "reporting/desired" string the operator writes next to the two counts.
    """
    return _columns(schema, [
        ("Phase", ".status.phase", 0),
        ("Nodes", ".status.summary.nodes", 0),
        ("Retransmits", ".status.summary.retransmits", 0),
        ("Duration", ".spec.duration", 1),
        ("Lost", ".status.summary.lostEvents", 1),
    ])


def report_printer_columns(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """Columns of `kubectl get rtreport`: the per-node table of a trace (with -l retransmit.dev/trace=NAME)."""
    return _columns(schema, [
        ("Node", ".spec.node", 0),
        ("Phase", ".spec.phase", 0),
        ("Retransmits", ".spec.retransmits", 0),
        ("SYN-ACK", ".spec.synackRetransmits", 0),
        ("Lost", ".spec.lostEvents", 0),
        ("Last Report", ".spec.lastReportTime", 0),
        ("Departed", ".status.departed", 1),
    ])


def report_openapi_schema() -> dict[str, Any]:
    return {
        "description": (
            "RetransmitNodeReport holds what one node saw in one RetransmitTrace, in full: counts, byState, "
            "top flows and pods, recent events, kernel and agent details. Written only by that node's agent "
            "(spec; an admission policy checks the node of its token), marked by the operator (status), owned "
            "by the trace. Named <trace>.<node>, labelled retransmit.dev/trace and retransmit.dev/node."
        ),
        "type": "object",
        "properties": {
            "apiVersion": {"type": "string", "description": "retransmit.dev/v1alpha1"},
            "kind": {"type": "string", "description": "RetransmitNodeReport"},
            "metadata": {"type": "object"},
            "spec": model_schema(api.NodeStatus, keep_defaults=False),
            "status": model_schema(api.NodeReportStatus, keep_defaults=False),
        },
    }


def _crd(name: str, scope: str, kind: str, plural: str, singular: str, short_name: str,
         schema: dict[str, Any], columns: list[dict[str, Any]]) -> dict[str, Any]:
    """A CustomResourceDefinition of the group: one served and stored version, a status subresource."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/name": APP_NAME, "app.kubernetes.io/part-of": APP_NAME},
        },
        "spec": {
            "group": api.GROUP,
            "scope": scope,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": singular,
                "shortNames": [short_name],
                "categories": ["retransmit"],
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


def build_report_crd() -> dict[str, Any]:
    schema = report_openapi_schema()
    return _crd(REPORT_CRD_NAME, "Namespaced", api.REPORT_KIND, api.REPORT_PLURAL, api.REPORT_SINGULAR,
                api.REPORT_SHORT_NAME, schema, report_printer_columns(schema))


def openapi_schema() -> dict[str, Any]:
    spec = model_schema(api.RetransmitTraceSpec, keep_defaults=True)
    spec["default"] = {}  # so the nested defaults apply to `spec: {}` and to a missing spec alike
    status = model_schema(api.RetransmitTraceStatus, keep_defaults=False)
    return {
        "description": (
            "RetransmitTrace counts TCP retransmits (kernel tracepoints tcp:tcp_retransmit_skb and "
            "tcp:tcp_retransmit_synack) on the selected nodes and reports which nodes, pods and "
            "connections retransmitted, in which TCP state, and when. Cluster-scoped: a trace runs "
            "privileged agents on nodes and sees every pod's traffic."
        ),
        "type": "object",
        "properties": {
            "apiVersion": {"type": "string", "description": "retransmit.dev/v1alpha1"},
            "kind": {"type": "string", "description": "RetransmitTrace"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "x-kubernetes-validations": [
            {
                "rule": f"size(self.metadata.name) <= {api.MAX_TRACE_NAME_LENGTH}",
                "message": (
                    f"metadata.name: at most {api.MAX_TRACE_NAME_LENGTH} characters, so the agents' "
                    "DaemonSet rtrace-<name> is a valid label value; choose a shorter name"
                ),
            },
            {
                "rule": f"self.metadata.name.matches(r'{api.DNS_LABEL_PATTERN}')",
                "message": (
                    "metadata.name: use lowercase letters, digits and '-' only, no dots: each node's report is "
                    "named <trace>.<node>, and a dot in the trace's name would let trace 'a' on node 'b.c' and "
                    "trace 'a.b' on node 'c' share a report"
                ),
            },
        ],
    }


def build_crd() -> dict[str, Any]:
    schema = openapi_schema()
    return _crd(CRD_NAME, "Cluster", api.KIND, api.PLURAL, api.SINGULAR, api.SHORT_NAME, schema, printer_columns(schema))


class _Dumper(yaml.SafeDumper):
    """Block style, long strings unwrapped, keys in the order built."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _str_representer)


def render_yaml(crd: Optional[dict[str, Any]] = None) -> str:
    return HEADER + yaml.dump(crd or build_crd(), Dumper=_Dumper, sort_keys=False, width=10_000, allow_unicode=True)


def generated() -> dict[Path, str]:
    """Every checked-in CRD file and the text the models give it."""
    trace, report = render_yaml(build_crd()), render_yaml(build_report_crd())
    return {**{p: trace for p in CRD_PATHS}, **{p: report for p in REPORT_CRD_PATHS}}


def repo_root(start: Optional[Path] = None) -> Path:
    """The checkout this package lives in (editable install), else the working directory."""
    for candidate in (Path(__file__).resolve().parent.parent, (start or Path.cwd()).resolve()):
        if (candidate / "pyproject.toml").exists() and (candidate / "operator").is_dir():
            return candidate
    raise SystemExit("cannot find the repository root (pyproject.toml next to operator/): run from the checkout")


def drifted(root: Path) -> list[Path]:
    """Checked-in copies that differ from what the models generate."""
    return [p for p, wanted in generated().items() if not (root / p).exists() or (root / p).read_text() != wanted]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retransmit_operator.crd", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help="write the CRD into manifests/ and the Helm chart")
    group.add_argument("--check", action="store_true", help="exit 1 if a checked-in copy drifted from the models")
    parser.add_argument("--root", type=Path, default=None, help="repository root (default: found from the package)")
    args = parser.parse_args(argv)
    if not (args.write or args.check):
        sys.stdout.write(render_yaml(build_crd()) + "---\n" + render_yaml(build_report_crd()))
        return 0
    root = args.root or repo_root()
    if args.check:
        stale = drifted(root)
        for p in stale:
            print(f"{p}: differs from the models; run `make crd` (python -m retransmit_operator.crd --write)", file=sys.stderr)
        return 1 if stale else 0
    for p, text in generated().items():
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        (root / p).write_text(text)
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
