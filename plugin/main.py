"""`kubectl retransmit` (and `oc retransmit`): run a trace, show or watch its result, check nodes.

    kubectl retransmit run [--node N | -l k=v] [--namespace-filter NS] [--port P] ... [--duration 2m] [--keep]
    kubectl retransmit show NAME [-o table|json|yaml]
    kubectl retransmit watch NAME
    kubectl retransmit check [--node N | -l k=v]

kubectl finds the `kubectl-retransmit` executable on PATH. Exit status: 0 done; 1 the trace
failed or a node cannot trace; 2 bad flags; 3 no cluster; 4 the CRD is not installed;
5 not allowed; 6 trace not found. Every failure is one line on stderr naming the fix.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from typing import Any, Callable, NoReturn, Optional, Sequence

import kubernetes
import yaml
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from retransmit_core.api import GROUP, KIND, PLURAL, REPORT_PLURAL, VERSION, RetransmitTraceSpec, to_api
from retransmit_core.apierrors import no_answer, server_message
from retransmit_core.naming import DEFAULT_NAMESPACE, trace_selector
from retransmit_core.validation import format_error

from .tables import progress_line, render, table

PROG = "kubectl retransmit"
EXIT_FAILED, EXIT_USAGE, EXIT_NO_CLUSTER, EXIT_NO_CRD, EXIT_FORBIDDEN, EXIT_NOT_FOUND = 1, 2, 3, 4, 5, 6
FINISHED = ("Completed", "Failed")


class PluginError(Exception):
    """One line for stderr and the exit status that goes with it."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise PluginError(f"{message} (see {PROG} --help)", EXIT_USAGE)


def labels(text: Optional[str], flag: str) -> dict[str, str]:
    """'a=b,c=d' -> {'a': 'b', 'c': 'd'}; PluginError naming the flag otherwise."""
    out = {}
    for part in filter(None, (text or "").split(",")):
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise PluginError(f"{flag} {text!r}: use key=value[,key=value]", EXIT_USAGE)
        out[key.strip()] = value.strip()
    return out


def spec_from_flags(ns: argparse.Namespace) -> dict[str, Any]:
    """The trace spec the `run` flags ask for, validated by the API's own model."""
    node_selector = labels(ns.selector, "--selector")
    if ns.node:
        node_selector["kubernetes.io/hostname"] = ns.node
    pod_selector = labels(ns.pod_selector, "--pod-selector")
    raw: dict[str, Any] = {
        "duration": ns.duration,
        "nodeSelector": node_selector or None,
        "namespaces": ns.namespace_filter or None,
        "podSelector": {"matchLabels": pod_selector} if pod_selector else None,
        "filter": {"ipFamilies": ns.family or None, "ports": ns.port or None,
                   "remoteCIDRs": ns.remote_cidr or None, "states": ns.state or None},
        "reportInterval": ns.report_interval,
    }
    raw["filter"] = {k: v for k, v in raw["filter"].items() if v is not None}
    raw = {k: v for k, v in raw.items() if v not in (None, {})}
    try:
        return to_api(RetransmitTraceSpec.model_validate(raw))
    except ValidationError as e:
        raise PluginError(format_error(e), EXIT_USAGE) from None


class Cluster:
    """The API calls the plugin makes, with failures turned into PluginError."""

    def __init__(self, kubeconfig: Optional[str], context: Optional[str], namespace: str) -> None:
        try:
            self.api = kubernetes.config.new_client_from_config(config_file=kubeconfig, context=context)
        except (kubernetes.config.ConfigException, OSError, TypeError) as e:
            raise PluginError(f"no cluster configured ({e}): pass --kubeconfig/--context or set KUBECONFIG",
                              EXIT_NO_CLUSTER) from None
        self.objects = kubernetes.client.CustomObjectsApi(self.api)
        self.namespace = namespace

    def call(self, what: str, fn: Callable[..., Any], *args: Any, name: Optional[str] = None, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ApiException as e:
            raise self._explain(what, e, name) from None
        except Exception as e:  # urllib3 connection errors and the like: the cluster is not there
            raise PluginError(f"cannot reach the cluster at {self.api.configuration.host} ({no_answer(e)}): "
                              "check --kubeconfig/--context and that the API server is up", EXIT_NO_CLUSTER) from None

    def _explain(self, what: str, e: ApiException, name: Optional[str]) -> PluginError:
        if e.status == 403:
            return PluginError(f"not allowed to {what}: ask an admin for the retransmittrace-editor "
                               "(or -viewer) ClusterRole", EXIT_FORBIDDEN)
        if e.status == 404 and not self.crd_installed():
            return PluginError(f"the {KIND} CRD is not installed in this cluster: helm install the "
                               "retransmit-operator chart (or kubectl apply -f manifests/)", EXIT_NO_CRD)
        if e.status == 404:
            return PluginError(f"trace {name} not found: kubectl get rtrace lists the traces", EXIT_NOT_FOUND)
        return PluginError(f"could not {what}: {server_message(e.body, e.reason or '')}", EXIT_FAILED)

    def crd_installed(self) -> bool:
        """Whether the API server serves retransmittraces (discovery of the group version:
        the group stays while the node reports' CRD is installed)."""
        try:
            resources = self.objects.get_api_resources(GROUP, VERSION).resources
        except ApiException as e:
            return e.status != 404
        except Exception:  # noqa: BLE001 - cannot tell: assume installed, the 404 is the trace's
            return True
        return any(r.name == PLURAL for r in resources or [])

    def get(self, name: str) -> dict[str, Any]:
        return self.call(f"get trace {name}", self.objects.get_cluster_custom_object, GROUP, VERSION, PLURAL, name,
                         name=name)

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.call("create traces", self.objects.create_cluster_custom_object, GROUP, VERSION, PLURAL, body)

    def delete(self, name: str) -> None:
        self.call(f"delete trace {name}", self.objects.delete_cluster_custom_object, GROUP, VERSION, PLURAL, name,
                  name=name)

    def reports(self, trace: str) -> list[dict[str, Any]]:
        listed = self.call(f"list node reports of {trace}", self.objects.list_namespaced_custom_object, GROUP, VERSION,
                           self.namespace, REPORT_PLURAL, label_selector=trace_selector(trace), name=trace)
        return listed.get("items", [])


def print_result(trace: dict[str, Any], output: str) -> None:
    if output == "json":
        print(json.dumps(trace, indent=2))
    elif output == "yaml":
        print(yaml.safe_dump(trace, sort_keys=False), end="")
    else:
        print(render(trace))


def wait_finished(cluster: Cluster, name: str, every: float, on_update: Callable[[dict[str, Any]], None]) -> dict:
    """Poll the trace until it is Completed or Failed, calling on_update at each poll."""
    while True:
        trace = cluster.get(name)
        on_update(trace)
        if (trace.get("status") or {}).get("phase") in FINISHED:
            return trace
        time.sleep(every)


def run(cluster: Cluster, ns: argparse.Namespace) -> int:
    name = ns.name or f"rtrace-{uuid.uuid4().hex[:6]}"
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": name}, "spec": spec_from_flags(ns)}
    cluster.create(body)
    print(f"trace {name} created; waiting for it to complete ({ns.duration})", file=sys.stderr)
    try:
        trace = wait_finished(cluster, name, ns.interval, lambda t: print(progress_line(t), file=sys.stderr))
    except KeyboardInterrupt:
        if not ns.keep:
            cluster.delete(name)
        return 130
    print_result(trace, ns.output)
    if not ns.keep:
        cluster.delete(name)
        print(f"trace {name} deleted (--keep keeps it)", file=sys.stderr)
    return EXIT_FAILED if trace["status"]["phase"] == "Failed" else 0


def watch(cluster: Cluster, ns: argparse.Namespace) -> int:
    def redraw(trace: dict[str, Any]) -> None:
        if sys.stdout.isatty():
            print("\033[H\033[2J", end="")
        print(render(trace), flush=True)
    trace = wait_finished(cluster, ns.name, ns.interval, redraw)
    return EXIT_FAILED if trace["status"]["phase"] == "Failed" else 0


def checked_reports(cluster: Cluster, name: str, every: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Poll until every node the trace selects has reported its kernel checks (or the trace
    ended): the trace and those reports."""
    while True:
        trace = cluster.get(name)
        status = trace.get("status") or {}
        desired = (status.get("summary") or {}).get("nodesDesired", 0)
        reports = [r for r in cluster.reports(name)
                   if r["spec"].get("kernelChecks") or r["spec"].get("phase") == "Failed"]
        print(f"{name}: {len(reports)}/{desired} nodes checked", file=sys.stderr)
        if (desired and len(reports) >= desired) or status.get("phase") in FINISHED:
            return trace, reports
        time.sleep(every)


def check(cluster: Cluster, ns: argparse.Namespace) -> int:
    """Each selected node's kernel checks, as its agent reports them in a short trace."""
    name = f"rtrace-check-{uuid.uuid4().hex[:6]}"
    node_selector = labels(ns.selector, "--selector") | ({"kubernetes.io/hostname": ns.node} if ns.node else {})
    spec = {"duration": ns.duration, **({"nodeSelector": node_selector} if node_selector else {})}
    cluster.create({"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": name}, "spec": spec})
    try:
        trace, reports = checked_reports(cluster, name, ns.interval)
    finally:
        cluster.delete(name)
    rows, failing = [], 0
    for report in sorted(reports, key=lambda r: r["spec"]["node"]):
        spec_ = report["spec"]
        checks = spec_.get("kernelChecks") or []
        bad = [c for c in checks if c["status"] == "fail"] or ([{"name": "agent", "detail": spec_.get("message")}]
                                                               if spec_.get("phase") == "Failed" else [])
        failing += bool(bad)
        degraded = [c["name"] for c in checks if c["status"] == "degraded"]
        mode = next((c["detail"] for c in checks if c["name"] == "mode"), "-")
        rows.append((spec_["node"], spec_.get("kernel"), "no" if bad else "yes",
                     "; ".join(f"{c['name']}: {c.get('detail')}" for c in bad) or ", ".join(degraded) or "-", mode))
    print("\n".join(table(("NODE", "KERNEL", "CAN COUNT", "PROBLEMS / DEGRADED", "MODE"), rows)))
    desired = ((trace.get("status") or {}).get("summary") or {}).get("nodesDesired", 0)
    if len(rows) < desired:
        silent = desired - len(rows)
        print(f"{silent} selected {'node' if silent == 1 else 'nodes'} never reported within {ns.duration}: check "
              f"their agent pods and logs (kubectl -n {cluster.namespace} get pods -o wide)", file=sys.stderr)
        failing += 1
    return EXIT_FAILED if failing else 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)")
    parser.add_argument("--context", help="kubeconfig context to use")
    parser.add_argument("-n", "--namespace", default=DEFAULT_NAMESPACE,
                        help=f"the operator's namespace, where node reports live (default {DEFAULT_NAMESPACE})")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    def selection(p: argparse.ArgumentParser) -> None:
        p.add_argument("--node", help="only this node (by name)")
        p.add_argument("-l", "--selector", help="only nodes with these labels: key=value[,key=value]")
        p.add_argument("--interval", type=float, default=2.0, help="seconds between progress lines (default 2)")

    r = sub.add_parser("run", help="create a trace from flags, show progress, print the result, delete it")
    selection(r)
    r.add_argument("--name", help="trace name (default rtrace-<random>)")
    r.add_argument("--duration", default="60s", help="how long to trace, e.g. 90s or 5m (default 60s)")
    r.add_argument("--namespace-filter", action="append", default=[], metavar="NS",
                   help="keep flows whose local side is a pod in NS (repeatable)")
    r.add_argument("--pod-selector", help="keep flows whose local pod has these labels: key=value[,...]")
    r.add_argument("--port", action="append", default=[], type=int, help="local or remote port (repeatable)")
    r.add_argument("--remote-cidr", action="append", default=[], help="remote address range (repeatable)")
    r.add_argument("--state", action="append", default=[], help="TCP state, e.g. ESTABLISHED (repeatable)")
    r.add_argument("--family", action="append", default=[], choices=["IPv4", "IPv6"], help="repeatable")
    r.add_argument("--report-interval", default=None, help="agents' report interval (default: the trace's 10s)")
    r.add_argument("--keep", action="store_true", help="keep the trace after printing the result")
    r.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")

    s = sub.add_parser("show", help="a trace's result as tables")
    s.add_argument("name")
    s.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")

    w = sub.add_parser("watch", help="a trace's result, refreshed until it completes")
    w.add_argument("name")
    w.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")

    c = sub.add_parser("check", help="can each selected node trace, and in which mode (runs a short trace)")
    selection(c)
    c.add_argument("--duration", default="2m", help="the longest the nodes get to report (default 2m)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        ns = build_parser().parse_args(argv)
        cluster = Cluster(ns.kubeconfig, ns.context, ns.namespace)
        if ns.command == "run":
            return run(cluster, ns)
        if ns.command == "show":
            print_result(cluster.get(ns.name), ns.output)
            return 0
        if ns.command == "watch":
            return watch(cluster, ns)
        return check(cluster, ns)
    except PluginError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
