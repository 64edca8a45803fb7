"""Upgrade from the release v0.1.0 to this tree, by the README's path, with a trace running.

`helm install` of v0.1.0's chart (its crds/ and templates, taken from the release commit v0.1.0 of
the repository this test runs in), a trace that counts real retransmits (nftables loss in a
network namespace of the test's own, checked against the reference counter), then the
README's Upgrade steps: this tree's CRDs by `kubectl apply --server-side --force-conflicts`,
then `helm upgrade --reset-values` to this tree's chart. The same trace (same uid, same
startTime) keeps running, no count it shows ever goes back (its status and both nodes'
reports, watched through the whole upgrade), its reports are the same objects, new
retransmits are counted on top, and the CRDs hold this tree's schemas.

What is old and what is new. The node simulator runs no images: it runs a container's command
as a host process. So the images stand for builds: v0.1.0's operator and agents run under an
image of the test's own (localhost/rtrace-upgrade-...:v0.1.0), for which the simulator puts a
build of the v0.1.0 tree first on $PATH (its own console scripts over its own packages, laid
out by its own pyproject.toml; NodeSimulator.image_bins). The upgrade sets the chart's default
images, so the new operator pod, and the agent pods it rolls out, run this tree's code. Old
before the upgrade: the CRDs (made by `helm install` of v0.1.0: the test deletes CRDs an earlier
test left), the chart's objects (RBAC, admission policies, Deployment), the operator and the
agents, the DaemonSet the old operator rendered, the status and reports the old code wrote.
New after it: all of them, the status and reports rewritten by the new code. Shared by both
sides: this venv's Python and dependencies (kopf, kubernetes, pydantic, bcc), the kernel,
and the simulated nodes in place of images and kubelet."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import tomllib
import uuid
from pathlib import Path
from typing import Optional

import pytest
import yaml

from retransmit_core.api import GROUP, PLURAL, REPORT_PLURAL, VERSION
from retransmit_core.naming import TRACE_LABEL, daemonset_name
from retransmit_core.watch import list_then_watch
from tests.deploy.kube import CHART, apply_trace, get_json, helm, install_crd, kubectl, unique, wait_for
from tests.harness.netns import LossNamespace
from tests.harness.refcount import ReferenceCounter, involving, per_flow

pytestmark = pytest.mark.deploy

REPO = Path(__file__).resolve().parents[2]
TAG = "v0.1.0"
RELEASE_COMMITS = {"v0.1.0": "5002d828eceb5851f0862098e1bc9852a12da8d2"}   # the tag's commit on main
CHART_PATH = "helm/retransmit-operator"             # inside the repository, at the tag and here
CRD_NAMES = ("retransmittraces.retransmit.dev", "retransmitnodereports.retransmit.dev")
NODES = ("node-a", "node-b")


# ---- the release v0.1.0, from its commit in this repository ----------------------------

def release_tree(tag: str, into: Path) -> Path:
    """The tree of the release `tag` (git archive of this repository), extracted into `into`.

    The release is found by its commit, pinned in RELEASE_COMMITS, because CI clones main
    without tags; the commit is an ancestor of main, so every full clone holds it. Where the
    tag exists too, it must name the same commit."""
    commit = RELEASE_COMMITS[tag]
    found = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{commit}^{{commit}}"],
                           capture_output=True, text=True)
    if found.returncode != 0:
        raise AssertionError(
            f"the commit {commit} of release {tag} is missing in {REPO} (a shallow clone?): this test installs "
            f"that release's chart and runs its code. Deepen the clone (`git fetch --unshallow`).")
    tagged = subprocess.run(["git", "-C", str(REPO), "rev-parse", "-q", "--verify", f"refs/tags/{tag}^{{commit}}"],
                            capture_output=True, text=True)
    assert tagged.returncode != 0 or tagged.stdout.strip() == commit, (
        f"the tag {tag} names {tagged.stdout.strip()}, RELEASE_COMMITS names {commit}: one of them is wrong")
    archive = into.with_suffix(".tar")
    subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", "-o", str(archive), commit], check=True)
    into.mkdir(parents=True)
    subprocess.run(["tar", "-xf", str(archive), "-C", str(into)], check=True)
    archive.unlink()
    return into


def build_release(tree: Path, into: Path) -> Path:
    """A build of `tree` as its pyproject.toml lays it out: each import package (a folder of
    the tree under its package-dir name) in `into`/site, and each console script in `into`/bin
    running its entry point with site first on sys.path. Each script says on stderr which
    file it runs, so the test can tell from a pod's log which build ran. Returns bin."""
    project = tomllib.loads((tree / "pyproject.toml").read_text())
    site, bin_ = into / "site", into / "bin"
    site.mkdir(parents=True)
    bin_.mkdir()
    for package, folder in project["tool"]["setuptools"]["package-dir"].items():
        (site / package).symlink_to(tree / folder, target_is_directory=True)
    for script, entry in project["project"]["scripts"].items():
        module, _, function = entry.partition(":")
        path = bin_ / script
        path.write_text(
            f"#!{sys.executable}\n"
            "import importlib, sys\n"
            f"sys.path.insert(0, {str(site)!r})\n"
            f"module = importlib.import_module({module!r})\n"
            f"print(f'{script}: runs {{module.__file__}}', file=sys.stderr, flush=True)\n"
            f"sys.exit(module.{function}())\n")
        path.chmod(0o755)
    return bin_


# ---- what the cluster shows -------------------------------------------------------------

def crd_schemas(crd: dict) -> dict[str, dict]:
    """version name -> its openAPIV3Schema, of a CRD as stored or as a file holds it."""
    return {v["name"]: v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"]}


def crd_files(chart: Path) -> dict[str, dict]:
    """CRD name -> the CRD, from a chart's crds/ folder."""
    docs = [yaml.safe_load(p.read_text()) for p in sorted((chart / "crds").glob("*.yaml"))]
    return {d["metadata"]["name"]: d for d in docs}


def property_paths(schema: dict, prefix: str = "") -> set[str]:
    """Every field path a schema declares (lists as [])."""
    paths = set()
    for name, sub in (schema.get("properties") or {}).items():
        paths.add(prefix + name)
        paths |= property_paths(sub, f"{prefix}{name}.")
    if "items" in schema:
        paths |= property_paths(schema["items"], prefix.rstrip(".") + "[].")
    return paths


def object_paths(obj, prefix: str = "") -> set[str]:
    """Every field path an object holds, in property_paths' notation."""
    paths = set()
    if isinstance(obj, dict):
        for name, value in obj.items():
            paths.add(prefix + name)
            paths |= object_paths(value, f"{prefix}{name}.")
    elif isinstance(obj, list):
        for item in obj:
            paths |= object_paths(item, prefix.rstrip(".") + "[].")
    return paths


def ready(pod: dict) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return not pod["metadata"].get("deletionTimestamp") and any(
        c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def image_of(pod: dict) -> str:
    return pod["spec"]["containers"][0]["image"]


class History:
    """Every version of the trace and of its reports the API server sends while it runs (a
    list, then a watch: retransmit_core.watch), for checks that span the upgrade."""

    def __init__(self, cp, trace: str, namespace: str):
        import kubernetes

        self.api = cp.api_client()
        self.custom = kubernetes.client.CustomObjectsApi(self.api)
        self.trace, self.namespace = trace, namespace
        self.lock = threading.Lock()
        self.traces: list[dict] = []             # every version seen, in order
        self.reports: list[dict] = []
        self.deleted: list[str] = []             # "kind/name" of every deletion seen
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._mirror, daemon=True, name="upgrade-trace-watch", args=(
                self.traces, "trace", lambda **kw: self.custom.list_cluster_custom_object(
                    GROUP, VERSION, PLURAL, field_selector=f"metadata.name={trace}", **kw))),
            threading.Thread(target=self._mirror, daemon=True, name="upgrade-report-watch", args=(
                self.reports, "report", lambda **kw: self.custom.list_namespaced_custom_object(
                    GROUP, VERSION, namespace, REPORT_PLURAL, label_selector=f"{TRACE_LABEL}={trace}", **kw))),
        ]

    def _mirror(self, into: list, kind: str, list_call) -> None:
        from kubernetes import watch

        def seen(obj: dict, deleted: bool = False) -> None:
            with self.lock:
                into.append(obj)
                if deleted:
                    self.deleted.append(f"{kind}/{obj['metadata']['name']}")

        def replace(items: list, _version: Optional[str]) -> None:
            for item in items:
                seen(item)

        list_then_watch(lambda: list_call(_request_timeout=60),
                        lambda version: watch.Watch().stream(list_call, resource_version=version, timeout_seconds=30,
                                                             _request_timeout=40),
                        replace, seen, self.stop, f"the upgrade test's {kind}")

    def __enter__(self) -> "History":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)
        self.api.close()

    def seen(self) -> tuple[list[dict], list[dict], list[str]]:
        with self.lock:
            return list(self.traces), list(self.reports), list(self.deleted)


def counts_going_back(versions: list[tuple[str, dict[str, int]]]) -> list[str]:
    """Each (key, counts) in order; the places where a count of a key is lower than before."""
    last: dict[tuple[str, str], int] = {}
    back = []
    for key, counts in versions:
        for name, value in counts.items():
            before = last.get((key, name), 0)
            if value < before:
                back.append(f"{key} {name}: {before} -> {value}")
            last[(key, name)] = max(before, value)
    return back


def trace_counts(trace: dict) -> dict[str, int]:
    status = trace.get("status") or {}
    summary = status.get("summary") or {}
    counts = {"summary.retransmits": summary.get("retransmits", 0),
              "summary.synackRetransmits": summary.get("synackRetransmits", 0)}
    counts.update({f"nodes[{row['node']}].retransmits": row.get("retransmits", 0) for row in status.get("nodes") or []})
    return counts


def report_counts(report: dict) -> dict[str, int]:
    spec = report.get("spec") or {}
    return {"retransmits": spec.get("retransmits", 0), "synackRetransmits": spec.get("synackRetransmits", 0)}


# ---- the test ---------------------------------------------------------------------------

class Upgrade:
    """One release, installed from v0.1.0's chart and upgraded to this tree's."""

    def __init__(self, cp, sim, tmp: Path):
        self.cp, self.sim = cp, sim
        self.name = unique("upg")
        self.ns = unique("rtrace-upg")
        self.old = release_tree(TAG, tmp / TAG)
        self.old_bin = build_release(self.old, tmp / "build")
        self.old_image = f"localhost/rtrace-upgrade-{uuid.uuid4().hex[:6]}:{TAG}"
        self.values = ["--set", f"namespace.name={self.ns}", "--set", f"fullnameOverride={self.name}"]

    def install_old(self) -> None:
        # helm installs crds/ only where no CRD of that name exists: take away an earlier
        # test's (and with them its leftover objects), so v0.1.0's chart makes its own.
        kubectl(self.cp, "delete", "crd", *CRD_NAMES, "--ignore-not-found", "--wait=true", "--timeout=180s")
        self.sim.image_bins[self.old_image] = str(self.old_bin)
        repository, _, tag = self.old_image.rpartition(":")
        helm(self.cp, "install", self.name, str(self.old / CHART_PATH), *self.values,
             "--set", f"image.repository={repository}", "--set", f"image.tag={tag}", "--wait", "--timeout", "240s")

    def upgrade(self) -> None:
        """The README's Upgrade section: the CRDs, server-side, then the release with its
        values given again (the default images here: the new code)."""
        kubectl(self.cp, "apply", "--server-side", "--force-conflicts", "-f", str(CHART / "crds"))
        for crd in CRD_NAMES:
            kubectl(self.cp, "wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
        helm(self.cp, "upgrade", self.name, str(CHART), "--reset-values", *self.values, "--wait", "--timeout", "240s")

    def teardown(self) -> None:
        helm(self.cp, "uninstall", self.name, "--wait", "--timeout", "120s", check=False)
        self.sim.image_bins.pop(self.old_image, None)
        install_crd(self.cp)                      # this tree's CRDs, whatever happened above

    def pods(self, selector: str) -> list[dict]:
        return (get_json(self.cp, "pods", "-n", self.ns, "-l", selector) or {}).get("items", [])

    def log(self, pod: dict) -> str:
        return self.sim.log_path(self.ns, pod["metadata"]["name"]).read_text(errors="replace")


@pytest.fixture
def upgrade(control_plane, node_simulator, tmp_path):
    up = Upgrade(control_plane, node_simulator, tmp_path)
    try:
        yield up
    finally:
        up.teardown()


def make_loss(ns: LossNamespace, port: int) -> None:
    ours = sorted(ns.v4)
    ns.random_loss(10)
    traffic = ns.python("tests.harness.traffic", "bulk", "--server-ip", ours[0], "--client-ip", ours[1],
                        "--port", str(port), "--connections", "4", "--bytes", str(2 << 20), "--duplex",
                        stdout=subprocess.PIPE, text=True)
    assert traffic.wait(timeout=240) == 0
    ns.clear_loss()
    ns.wait_quiet()


def test_a_running_trace_and_its_results_survive_the_upgrade_from_v0_1_0(upgrade, control_plane):
    cp, up = control_plane, upgrade
    old_crds, new_crds = crd_files(up.old / CHART_PATH), crd_files(CHART)
    up.install_old()
    stored = {name: get_json(cp, "crd", name) for name in CRD_NAMES}
    assert {n: crd_schemas(c) for n, c in stored.items()} == {n: crd_schemas(old_crds[n]) for n in CRD_NAMES}, \
        "helm install of v0.1.0 did not make v0.1.0's CRDs"

    operator_selector, agent_selector = "app.kubernetes.io/component=operator", "app.kubernetes.io/component=agent"
    (old_operator,) = wait_for("v0.1.0's operator pod, ready", lambda: [
        p for p in up.pods(operator_selector) if ready(p)] or None)
    assert image_of(old_operator) == up.old_image
    assert f"runs {up.old_bin.parent}/site/retransmit_operator/" in up.log(old_operator), up.log(old_operator)[-3000:]

    with ReferenceCounter() as ref, LossNamespace(prefix="rtupg") as ns:
        ours = set(ns.v4)
        name = unique("upgraded")
        apply_trace(cp, name, ours, reportInterval="2s")
        try:
            def nodes_running():
                status = (get_json(cp, "rtrace", name) or {}).get("status") or {}
                rows = {n["node"]: n.get("phase") for n in status.get("nodes") or []}
                return status if all(rows.get(n) == "Running" for n in NODES) else None

            wait_for("v0.1.0's agents attached on both nodes", nodes_running, timeout=240)
            old_agents = up.pods(f"{agent_selector},{TRACE_LABEL}={name}")
            assert {p["spec"]["nodeName"] for p in old_agents} == set(NODES)
            for pod in old_agents:
                assert image_of(pod) == up.old_image
                assert f"runs {up.old_bin.parent}/site/retransmit_agent/" in up.log(pod), up.log(pod)[-3000:]

            def counted(total: int):
                def probe():
                    status = (get_json(cp, "rtrace", name) or {}).get("status") or {}
                    rows = {n["node"]: n.get("retransmits", 0) for n in status.get("nodes") or []}
                    summary = (status.get("summary") or {}).get("retransmits")
                    return status if rows == {n: total for n in NODES} and summary == len(NODES) * total else None
                return probe

            make_loss(ns, 23000 + os.getpid() % 20000)
            before = sum(r for r, _s in per_flow(ref.read(), involving(ours)).values())
            assert before > 0, "the loss rule made no retransmits: the test proves nothing"
            # Both simulated nodes run on this one kernel: each agent counts every one of ours.
            wait_for(f"v0.1.0 to count {before} retransmits on each node", counted(before), timeout=180)

            trace = get_json(cp, "rtrace", name)
            reports = {r["spec"]["node"]: r for r in get_json(
                cp, "rtreport", "-n", up.ns, "-l", f"{TRACE_LABEL}={name}")["items"]}
            assert set(reports) == set(NODES)
            daemonset = get_json(cp, "daemonset", "-n", up.ns, daemonset_name(name))

            with History(cp, name, up.ns) as history:
                def watching():
                    traces, reports_seen, _deleted = history.seen()
                    return traces and len({r["metadata"]["uid"] for r in reports_seen}) == len(NODES)

                wait_for("the watches to see the trace and both reports", watching)
                up.upgrade()

                # The CRDs are this tree's.
                stored = {n: get_json(cp, "crd", n, "--show-managed-fields") for n in CRD_NAMES}
                assert {n: crd_schemas(c) for n, c in stored.items()} == {n: crd_schemas(new_crds[n]) for n in CRD_NAMES}
                new_fields = {}
                for n, crd in stored.items():
                    managers = {(m["manager"], m["operation"]) for m in crd["metadata"]["managedFields"]}
                    assert ("kubectl", "Apply") in managers, (n, managers)
                    (version, schema), = crd_schemas(new_crds[n]).items()
                    new_fields[n] = property_paths(schema) - property_paths(crd_schemas(old_crds[n])[version])
                    print(f"upgrade: {n}: fields this tree adds to {TAG}'s schema: {sorted(new_fields[n])}")

                # The new operator runs this tree's code; it rolls the agents out with the new image.
                def new_operator():
                    pods = up.pods(operator_selector)
                    return pods if pods and all(ready(p) and image_of(p) != up.old_image for p in pods) else None

                (operator,) = wait_for("the upgraded operator pod, alone and ready", new_operator, timeout=240)
                assert str(up.old_bin.parent) not in up.log(operator), "the new operator ran the v0.1.0 build"

                def new_agents():
                    pods = up.pods(f"{agent_selector},{TRACE_LABEL}={name}")
                    fresh = [p for p in pods if ready(p) and image_of(p) != up.old_image]
                    return fresh if len(fresh) == len(pods) == len(NODES) else None

                agents = wait_for("the new operator's agents, attached on both nodes", new_agents, timeout=300)
                assert {p["spec"]["nodeName"] for p in agents} == set(NODES)
                assert not {p["metadata"]["name"] for p in agents} & {p["metadata"]["name"] for p in old_agents}
                for pod in agents:
                    assert str(up.old_bin.parent) not in up.log(pod), f"{pod['metadata']['name']} ran the v0.1.0 build"

                # New retransmits are counted on top of the old ones.
                make_loss(ns, 23000 + os.getpid() % 20000 + 1)
                total = sum(r for r, _s in per_flow(ref.read(), involving(ours)).values())
                assert total > before, "the second loss made no retransmits: the test proves nothing"
                wait_for(f"the upgraded trace to count {total} retransmits on each node", counted(total), timeout=180)
                seen_traces, seen_reports, deleted = history.seen()

            after = get_json(cp, "rtrace", name)
            assert after["metadata"]["uid"] == trace["metadata"]["uid"]
            assert after["status"]["startTime"] == trace["status"]["startTime"]
            assert after["status"]["phase"] == "Running"
            reports_after = {r["spec"]["node"]: r for r in get_json(
                cp, "rtreport", "-n", up.ns, "-l", f"{TRACE_LABEL}={name}")["items"]}
            assert {n: r["metadata"]["uid"] for n, r in reports_after.items()} == \
                {n: r["metadata"]["uid"] for n, r in reports.items()}, "the reports are not the same objects"
            # The new agents write fields only this tree's schema has, and the API server keeps
            # them (under v0.1.0's schema it would prune them): the CRD step took effect.
            kept = {n: sorted(object_paths(r) & new_fields[CRD_NAMES[1]]) for n, r in reports_after.items()}
            assert all(kept.values()), f"no field new since {TAG} is stored in the reports: {kept}"
            assert not object_paths(reports[NODES[0]]) & new_fields[CRD_NAMES[1]]
            print(f"upgrade: new fields stored in the reports: {kept}")
            assert get_json(cp, "daemonset", "-n", up.ns, daemonset_name(name))["metadata"]["uid"] == \
                daemonset["metadata"]["uid"], "the agents' DaemonSet was made anew, not re-rendered"

            # Through the whole upgrade, as the API server stored them: nothing went back.
            assert deleted == []
            assert {t["metadata"]["uid"] for t in seen_traces} == {trace["metadata"]["uid"]}
            assert {(t.get("status") or {}).get("phase") for t in seen_traces} == {"Running"}
            assert {(t.get("status") or {}).get("startTime") for t in seen_traces} == {trace["status"]["startTime"]}
            assert counts_going_back([("trace", trace_counts(t)) for t in seen_traces]) == []
            assert {r["metadata"]["uid"] for r in seen_reports} == {r["metadata"]["uid"] for r in reports.values()}
            assert counts_going_back([(r["spec"]["node"], report_counts(r)) for r in seen_reports]) == []
            print(f"upgrade: {before} retransmits per node under {TAG}, {total} after the upgrade; "
                  f"{len(seen_traces)} trace and {len(seen_reports)} report versions watched")
        finally:
            kubectl(cp, "delete", "rtrace", name, "--wait=false", check=False)
