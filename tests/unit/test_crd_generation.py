"""The CRD comes from the pydantic models: structural, list-maps where writers share lists,
printer columns that exist, and checked-in copies that match (drift fails here)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from retransmit_core import api
from retransmit_operator import crd

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def _schema() -> dict:
    return crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _walk(node, path="<root>"):
    yield path, node
    for name, sub in (node.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}[*]")


def test_checked_in_crd_copies_match_the_models():
    assert crd.drifted(ROOT) == [], "run `make crd` (python -m retransmit_operator.crd --write) and commit the result"


def test_check_flag_exits_nonzero_on_drift_and_zero_after_write(tmp_path):
    for p in crd.CRD_PATHS + crd.REPORT_CRD_PATHS:
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / p, tmp_path / p)
    assert crd.main(["--check", "--root", str(tmp_path)]) == 0
    chart_copy = tmp_path / crd.CRD_PATHS[1]
    chart_copy.write_text(chart_copy.read_text().replace("maximum: 100\n", "maximum: 1000\n", 1))
    assert crd.main(["--check", "--root", str(tmp_path)]) == 1
    assert crd.main(["--write", "--root", str(tmp_path)]) == 0
    assert crd.main(["--check", "--root", str(tmp_path)]) == 0


def test_schema_is_structural_every_node_typed_no_refs_or_unions():
    forbidden = {"$ref", "anyOf", "oneOf", "allOf", "nullable", "title", "$defs"}
    for path, node in _walk(_schema()):
        assert not forbidden & node.keys(), f"{path} has {forbidden & node.keys()}"
        assert "type" in node, f"{path} has no type"
        assert node.get("additionalProperties") is not False, path
        if "default" in node:
            assert ".status" not in path, f"{path}: status carries no defaults"


def test_crd_identity_scope_names_and_status_subresource():
    c = crd.build_crd()
    assert c["metadata"]["name"] == "retransmittraces.retransmit.dev"
    assert c["spec"]["scope"] == "Cluster"
    assert c["spec"]["names"]["shortNames"] == ["rtrace"]
    (version,) = c["spec"]["versions"]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}


def test_node_rows_are_one_atomic_list_and_conditions_a_list_map_keyed_by_type():
    status = _schema()["properties"]["status"]["properties"]
    assert status["nodes"]["x-kubernetes-list-type"] == "atomic"
    assert "x-kubernetes-list-map-keys" not in status["nodes"]
    assert "node" in status["nodes"]["items"]["required"]
    assert status["conditions"]["x-kubernetes-list-type"] == "map"
    assert status["conditions"]["x-kubernetes-list-map-keys"] == ["type"]


def test_printer_columns_are_phase_nodes_retransmits_age_and_point_at_real_fields():
    version = crd.build_crd()["spec"]["versions"][0]
    columns = [c for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert [c["name"] for c in columns] == ["Phase", "Nodes", "Retransmits", "Age"]
    schema = version["schema"]["openAPIV3Schema"]
    for c in version["additionalPrinterColumns"]:
        if c["jsonPath"].startswith(".metadata"):
            continue
        assert crd._field_at(schema, c["jsonPath"])["type"] == c["type"]


def test_every_spec_field_has_a_description_for_kubectl_explain():
    spec = _schema()["properties"]["spec"]
    for path, node in _walk(spec, "spec"):
        if path.endswith("[]") or path.endswith("[*]"):
            continue
        assert node.get("description"), f"{path} has no description"


def test_spec_constraints_reach_the_schema():
    spec = _schema()["properties"]["spec"]["properties"]
    f = spec["filter"]["properties"]
    assert f["ports"]["items"]["minimum"] == 1 and f["ports"]["items"]["maximum"] == 65535
    assert f["states"]["items"]["enum"] == list(api.TCP_STATES)
    assert f["ipFamilies"]["items"]["enum"] == ["IPv4", "IPv6"]
    assert spec["topFlows"]["minimum"] == 1 and spec["topFlows"]["maximum"] == 100
    assert spec["events"]["properties"]["keep"]["maximum"] == 100
    assert any("duration(self) >= duration('1s')" in r["rule"] for r in spec["reportInterval"]["x-kubernetes-validations"])
    for name in ("ports", "states", "ipFamilies", "remoteCIDRs"):
        assert f[name]["x-kubernetes-list-type"] == "set"


@pytest.mark.parametrize("cidr, ok", [
    ("10.0.0.0/8", True), ("198.18.0.0/15", True), ("0.0.0.0/0", True), ("fd00::/8", True), ("::/0", True),
    ("2001:db8::1/128", True), ("::ffff:10.0.0.1/128", True),
    ("10.0.0.0/33", False), ("256.0.0.0/8", False), ("10.0.0/8", False), ("10.0.0.0", False),
    ("fd00::/129", False), ("fd00::", False), ("banana", False), ("10.0.0.0/8 ", False),
])
def test_cidr_pattern_in_schema(cidr, ok):
    assert bool(re.fullmatch(api.CIDR_PATTERN, cidr)) is ok


def test_generated_yaml_parses_back_to_the_built_crd():
    text = crd.render_yaml()
    assert text.startswith("# Generated")
    assert yaml.safe_load(text) == crd.build_crd()


def test_the_crds_hold_only_what_the_api_server_stores():
    """A keyword Kubernetes' JSONSchemaProps lacks is dropped by the API server, so the stored
    CRD would differ from the file and a second server-side apply (helm after kubectl) conflicts."""
    allowed = {"description", "type", "format", "enum", "pattern", "minimum", "maximum", "minLength", "maxLength",
               "minItems", "maxItems", "maxProperties", "minProperties", "default", "required", "properties", "items",
               "additionalProperties", "nullable", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "uniqueItems",
               "x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-validations",
               "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string", "x-kubernetes-map-type"}
    for build in (crd.build_crd, crd.build_report_crd):
        schema = build()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for path, node in _walk(schema, "root"):
            assert set(node) <= allowed, f"{path}: {set(node) - allowed}"
