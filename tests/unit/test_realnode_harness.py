"""The real node's pure pieces: the test-only runc capability filter, the sandbox image
archive, the host-state comparison."""

import json
import tarfile

import pytest

from tests.harness import runc_capfilter
from tests.harness.realnode import sandbox_image_archive
from tests.harness.realnode_host import HostState

pytestmark = pytest.mark.unit


def test_capability_filter_keeps_only_what_the_bounding_set_has():
    process = {"capabilities": {"bounding": ["CAP_BPF", "CAP_SYS_RESOURCE", "CAP_PERFMON"],
                                "effective": ["CAP_SYS_RESOURCE"], "ambient": []}}
    removed = runc_capfilter.filter_process(process, {"CAP_BPF", "CAP_PERFMON"})
    assert removed == ["CAP_SYS_RESOURCE"]
    assert process["capabilities"] == {"bounding": ["CAP_BPF", "CAP_PERFMON"], "effective": [], "ambient": []}


def test_capability_names_follow_the_kernel_numbering():
    assert runc_capfilter.CAPABILITIES[24] == "SYS_RESOURCE"
    assert runc_capfilter.CAPABILITIES[38:40] == ("PERFMON", "BPF")


def test_capability_filter_rewrites_the_bundle_and_execs_runc_with_the_same_arguments(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps(
        {"process": {"capabilities": {"bounding": ["CAP_CHOWN", "CAP_SYS_RESOURCE"]}}}))
    monkeypatch.setattr(runc_capfilter, "bounding_set", lambda: {"CAP_CHOWN"})
    calls = []
    monkeypatch.setattr(runc_capfilter.os, "execv", lambda path, argv: calls.append((path, argv)))
    monkeypatch.setenv("RTRACE_RUNC", "/usr/sbin/runc")
    argv = ["--root", "/r", "create", "--bundle", str(tmp_path), "--pid-file", "p", "id"]
    runc_capfilter.main(argv)
    assert json.loads((tmp_path / "config.json").read_text())["process"]["capabilities"] == {"bounding": ["CAP_CHOWN"]}
    assert calls == [("/usr/sbin/runc", ["/usr/sbin/runc", *argv])]


def test_withheld_capabilities_are_dropped_from_unprivileged_containers_only(tmp_path, monkeypatch):
    host = {"CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN"}
    unprivileged = {"capabilities": {"bounding": ["CAP_BPF", "CAP_PERFMON"], "effective": ["CAP_BPF", "CAP_PERFMON"]}}
    privileged = {"capabilities": {"bounding": sorted(host), "effective": sorted(host)}}
    monkeypatch.delenv("RTRACE_CAPFILTER_WITHHOLD", raising=False)
    assert runc_capfilter.withheld() == set()
    withhold = tmp_path / "withhold"
    monkeypatch.setenv("RTRACE_CAPFILTER_WITHHOLD", str(withhold))
    assert runc_capfilter.withheld() == set()               # no file: nothing withheld
    withhold.write_text("CAP_PERFMON\n")
    assert runc_capfilter.withheld() == {"CAP_PERFMON"}
    assert runc_capfilter.filter_process(unprivileged, runc_capfilter.allowed_for(
        unprivileged, host, runc_capfilter.withheld())) == ["CAP_PERFMON"]
    assert unprivileged["capabilities"]["effective"] == ["CAP_BPF"]
    assert runc_capfilter.filter_process(privileged, runc_capfilter.allowed_for(
        privileged, host, runc_capfilter.withheld())) == []


def test_sandbox_image_is_an_oci_layout_naming_the_image_with_pause_as_entrypoint(tmp_path):
    pause = tmp_path / "pause"
    pause.write_bytes(b"\x7fELF not really")
    archive = sandbox_image_archive(pause, tmp_path / "image.tar", ref="registry.k8s.io/pause:9.9")
    with tarfile.open(archive) as t:
        index = json.load(t.extractfile("index.json"))
        [entry] = index["manifests"]
        assert entry["annotations"]["io.containerd.image.name"] == "registry.k8s.io/pause:9.9"
        manifest = json.load(t.extractfile(f"blobs/sha256/{entry['digest'].split(':')[1]}"))
        config = json.load(t.extractfile(f"blobs/sha256/{manifest['config']['digest'].split(':')[1]}"))
        assert config["config"]["Entrypoint"] == ["/pause"]
        [layer] = manifest["layers"]
        with tarfile.open(fileobj=t.extractfile(f"blobs/sha256/{layer['digest'].split(':')[1]}")) as inner:
            assert inner.extractfile("pause").read() == pause.read_bytes()
            assert inner.getmember("pause").mode == 0o755


def test_host_state_differences_name_each_changed_field():
    before = HostState(sysctls={"kernel.panic": "1"}, paths=[], cgroups=[])
    after = HostState(sysctls={"kernel.panic": "10"}, paths=["/var/lib/kubelet"], cgroups=[])
    assert before.differences(after) == {"sysctls": ({"kernel.panic": "1"}, {"kernel.panic": "10"}),
                                         "paths": ([], ["/var/lib/kubelet"])}
    assert before.differences(HostState(sysctls={"kernel.panic": "1"})) == {}
