"""`kubectl retransmit` (and `oc retransmit`): run a trace, show or watch its result, check nodes.

    kubectl retransmit run [-n NS | -A] [--node N | -l k=v] [--port P] ... [--duration 2m] [--keep] [-o FORM]
    kubectl retransmit show NAME [-w] [-n NS] [-o table|wide|json|yaml|name|jsonpath=TEMPLATE]
    kubectl retransmit watch NAME            (the same as show -w)
    kubectl retransmit delete NAME...
    kubectl retransmit check [--node N | -l k=v]

Global flags (--kubeconfig, --context, -n/--namespace, -A/--all-namespaces,
--operator-namespace) go before or after the subcommand, as kubectl's do. -n is the pods'
namespace, as in `kubectl get pods`; --operator-namespace is where the node reports live.
kubectl finds the `kubectl-retransmit` executable on PATH (and `kubectl_complete-retransmit`
for shell completion, kubectl 1.26+). Exit status: 0 done; 1 the trace failed or a node cannot
trace; 2 bad flags; 3 no cluster; 4 the CRD is not installed; 5 not allowed; 6 trace not found.
Every failure is one line on stderr naming the fix.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import time
import uuid
from typing import Any, Callable, NoReturn, Optional, Sequence

import kubernetes
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from retransmit_core.api import GROUP, KIND, PLURAL, REPORT_PLURAL, VERSION, RetransmitTraceSpec, to_api
from retransmit_core.apierrors import no_answer, server_message
from retransmit_core.naming import DEFAULT_NAMESPACE, trace_selector
from retransmit_core.validation import format_error
from retransmit_core.version import package_version

from .tables import JSONPATH, OUTPUTS, RESOURCE, SORT_KEYS, Output, format_trace, parse_output, progress_line, table

PROG = "kubectl retransmit"
EXIT_FAILED, EXIT_USAGE, EXIT_NO_CLUSTER, EXIT_NO_CRD, EXIT_FORBIDDEN, EXIT_NOT_FOUND = 1, 2, 3, 4, 5, 6
FINISHED = ("Completed", "Failed")
# The distribution `pip install ./plugin` makes (plugin/pyproject.toml): the plugin without
# the operator. retransmit_core.version names the whole project's; --version tries both.
LEAN_DISTRIBUTION = "kubectl-retransmit"


class PluginError(Exception):
    """One line for stderr and the exit status that goes with it."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise PluginError(f"{message} (see {self.prog} --help)", EXIT_USAGE)


def labels(text: Optional[str], flag: str) -> dict[str, str]:
    """'a=b,c=d' -> {'a': 'b', 'c': 'd'}; PluginError naming the flag otherwise."""
    out = {}
    for part in filter(None, (text or "").split(",")):
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise PluginError(f"{flag} {text!r}: use key=value[,key=value]", EXIT_USAGE)
        out[key.strip()] = value.strip()
    return out


def pod_namespaces(ns: argparse.Namespace, context_namespace: str) -> Optional[list[str]]:
    """The pods' namespaces the flags select, as `kubectl get pods` reads them: -A all (None),
    -n NS (plus run's --namespace-filter), else the kubeconfig context's namespace."""
    if ns.all_namespaces and ns.namespace_filter:
        raise PluginError("-A/--all-namespaces and --namespace-filter: pick one", EXIT_USAGE)
    if ns.all_namespaces:
        return None
    chosen = ([ns.namespace] if ns.namespace else []) + [n for n in ns.namespace_filter if n != ns.namespace]
    return chosen or [context_namespace]


def spec_from_flags(ns: argparse.Namespace, namespaces: Optional[list[str]]) -> dict[str, Any]:
    """The trace spec the `run` flags ask for (`namespaces`: None for all), validated by the
    API's own model."""
    node_selector = labels(ns.selector, "--selector")
    if ns.node:
        node_selector["kubernetes.io/hostname"] = ns.node
    pod_selector = labels(ns.pod_selector, "--pod-selector")
    raw: dict[str, Any] = {
        "duration": ns.duration,
        "nodeSelector": node_selector or None,
        "namespaces": namespaces,
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

    def __init__(self, kubeconfig: Optional[str], context: Optional[str], operator_namespace: str) -> None:
        try:
            self.api = kubernetes.config.new_client_from_config(config_file=kubeconfig, context=context)
            contexts, active = kubernetes.config.list_kube_config_contexts(config_file=kubeconfig)
        except (kubernetes.config.ConfigException, OSError, TypeError) as e:
            raise PluginError(f"no cluster configured ({e}): pass --kubeconfig/--context or set KUBECONFIG",
                              EXIT_NO_CLUSTER) from None
        chosen = next((c for c in contexts if c.get("name") == context), active) if context else active
        # The namespace kubectl uses when -n is not given.
        self.context_namespace: str = ((chosen or {}).get("context") or {}).get("namespace") or "default"
        self.objects = kubernetes.client.CustomObjectsApi(self.api)
        self.namespace = operator_namespace

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

    def names(self, timeout: Any) -> list[str]:
        """Every trace's name (for completion: the caller treats any failure as none)."""
        listed = self.objects.list_cluster_custom_object(GROUP, VERSION, PLURAL, _request_timeout=timeout)
        return sorted(t["metadata"]["name"] for t in listed.get("items", []))

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


def print_result(trace: dict[str, Any], ns: argparse.Namespace) -> None:
    # jsonpath prints exactly what the template says, as kubectl's does: no newline added.
    end = "" if ns.output.form == JSONPATH else "\n"
    print(format_trace(trace, ns.output, ns.namespace_rows, sort=ns.sort), end=end, flush=True)


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
    namespaces = pod_namespaces(ns, cluster.context_namespace)
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": name},
            "spec": spec_from_flags(ns, namespaces)}
    cluster.create(body)
    scope = f"pods in {', '.join(namespaces)}" if namespaces else "pods in all namespaces"
    print(f"trace {name} created for {scope}; waiting for it to complete ({ns.duration})", file=sys.stderr)
    try:
        trace = wait_finished(cluster, name, ns.interval, lambda t: print(progress_line(t), file=sys.stderr))
    except KeyboardInterrupt:
        if not ns.keep:
            cluster.delete(name)
        return 130
    print_result(trace, ns)
    if not ns.keep:
        cluster.delete(name)
        print(f"trace {name} deleted (--keep keeps it)", file=sys.stderr)
    return EXIT_FAILED if trace["status"]["phase"] == "Failed" else 0


def watch(cluster: Cluster, ns: argparse.Namespace) -> int:
    """`show -w` and `watch`: tables redrawn at each poll; the other forms printed again
    whenever the trace changes (as `kubectl get -w` does), until the trace ends."""
    seen: list[Optional[str]] = [None]

    def redraw(trace: dict[str, Any]) -> None:
        if ns.output.form in ("table", "wide"):
            if sys.stdout.isatty():
                print("\033[H\033[2J", end="")
        elif trace["metadata"].get("resourceVersion") == seen[0]:
            return
        seen[0] = trace["metadata"].get("resourceVersion")
        print_result(trace, ns)
    trace = wait_finished(cluster, ns.name, ns.interval, redraw)
    return EXIT_FAILED if trace["status"]["phase"] == "Failed" else 0


def show(cluster: Cluster, ns: argparse.Namespace) -> int:
    if ns.watch:
        return watch(cluster, ns)
    print_result(cluster.get(ns.name), ns)
    return 0


def delete(cluster: Cluster, ns: argparse.Namespace) -> int:
    for name in ns.names:
        cluster.delete(name)
        print(f'{RESOURCE} "{name}" deleted')
    return 0


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


EXAMPLES = {
    None: """examples:
  # trace pods in namespace shop for two minutes, print where they retransmitted, clean up
  kubectl retransmit run -n shop --duration 2m
  # a kept trace's result, refreshed until it completes
  kubectl retransmit show shop-loss -w
  # can every node trace, and how
  kubectl retransmit check""",
    "run": """examples:
  # pods in namespace shop, every node, two minutes
  kubectl retransmit run -n shop --duration 2m
  # pods in every namespace, port 443 only, nodes labelled pool=blue; keep the trace
  kubectl retransmit run -A --port 443 -l pool=blue --keep --name blue-443
  # another cluster, the result as JSON
  kubectl retransmit run --context kind-x -n shop -o json""",
    "show": """examples:
  kubectl retransmit show shop-loss
  # only the rows of pods in namespace shop, with more columns
  kubectl retransmit show shop-loss -n shop -o wide
  # refresh until the trace completes
  kubectl retransmit show shop-loss -w
  kubectl retransmit show shop-loss -o jsonpath='{.status.summary.retransmits}'
  kubectl retransmit show shop-loss -o yaml --context kind-x""",
    "watch": """examples:
  kubectl retransmit watch shop-loss
  kubectl retransmit watch shop-loss --interval 10 -o json""",
    "delete": """examples:
  kubectl retransmit delete shop-loss
  kubectl retransmit delete shop-loss blue-443 --context kind-x""",
    "check": """examples:
  kubectl retransmit check
  kubectl retransmit check --node worker-3
  # the operator installed in namespace tracing
  kubectl retransmit check -l pool=blue --operator-namespace tracing""",
}


def output_flag(text: str) -> Output:
    try:
        return parse_output(text)
    except ValueError as e:           # JsonPathError included: the template's fault and where
        raise argparse.ArgumentTypeError(str(e)) from None


def global_flags(p: argparse.ArgumentParser, top: bool) -> None:
    """kubectl's global flags. Every subcommand takes them too; there their defaults are
    SUPPRESS, so a flag given before the subcommand is not reset by the subcommand's parser."""
    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS
    g = p.add_argument_group("global flags (before or after the subcommand)")
    g.add_argument("--kubeconfig", default=default(None), help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)")
    g.add_argument("--context", default=default(None), help="kubeconfig context to use")
    g.add_argument("-n", "--namespace", default=default(None), metavar="NS",
                   help="the pods' namespace, as in kubectl get pods: run traces pods there (default: the "
                        "context's namespace); show and watch list only their flows and pods")
    g.add_argument("-A", "--all-namespaces", action="store_true", default=default(False),
                   help="pods in every namespace (run: trace them all)")
    g.add_argument("--operator-namespace", default=default(DEFAULT_NAMESPACE), metavar="NS",
                   help=f"the operator's namespace, where node reports live (default {DEFAULT_NAMESPACE})")


def output_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", type=output_flag, default=Output("table"), metavar="FORM",
                   help=f"{'|'.join(OUTPUTS)}|{JSONPATH}=TEMPLATE (default table)")
    p.add_argument("--sort", choices=SORT_KEYS, default=SORT_KEYS[0],
                   help="order of the top flows and top pods in the tables: retransmits (busiest first, the "
                        "default) or ratio (each connection's, or pod's network namespace's, retransmitted/sent "
                        "segments, highest first)")


def build_parser() -> argparse.ArgumentParser:
    def command(name: Optional[str], **kwargs: Any) -> argparse.ArgumentParser:
        p = (OneLineParser if name is None else sub.add_parser)(  # type: ignore[operator]
            *(() if name is None else (name,)), epilog=EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
        global_flags(p, top=name is None)
        return p

    sub: Any = None
    parser = command(None, prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"{PROG} {plugin_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser, metavar="COMMAND")

    def selection(p: argparse.ArgumentParser) -> None:
        p.add_argument("--node", help="only this node (by name)")
        p.add_argument("-l", "--selector", help="only nodes with these labels: key=value[,key=value]")
        p.add_argument("--interval", type=float, default=2.0, help="seconds between progress lines (default 2)")

    r = command("run", help="create a trace from flags, show progress, print the result, delete it")
    selection(r)
    r.add_argument("--name", help="trace name (default rtrace-<random>)")
    r.add_argument("--duration", default="60s", help="how long to trace, e.g. 90s or 5m (default 60s)")
    r.add_argument("--namespace-filter", action="append", default=[], metavar="NS",
                   help="another namespace to trace, as -n (repeatable)")
    r.add_argument("--pod-selector", help="keep flows whose local pod has these labels: key=value[,...]")
    r.add_argument("--port", action="append", default=[], type=int, help="local or remote port (repeatable)")
    r.add_argument("--remote-cidr", action="append", default=[], help="remote address range (repeatable)")
    r.add_argument("--state", action="append", default=[], help="TCP state, e.g. ESTABLISHED (repeatable)")
    r.add_argument("--family", action="append", default=[], choices=["IPv4", "IPv6"], help="repeatable")
    r.add_argument("--report-interval", default=None, help="agents' report interval (default: the trace's 10s)")
    r.add_argument("--keep", action="store_true", help="keep the trace after printing the result")
    output_option(r)

    def watching(p: argparse.ArgumentParser) -> None:
        p.add_argument("name", help="the trace (kubectl get rtrace lists them)")
        p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
        output_option(p)

    s = command("show", help="a trace's result as tables (or -o json, yaml, name, jsonpath=...)")
    watching(s)
    s.add_argument("-w", "--watch", action="store_true", help="refresh until the trace completes (as watch)")

    watching(command("watch", help="a trace's result, refreshed until it completes (show -w)"))

    d = command("delete", help="delete traces (their agents and node reports go with them)")
    d.add_argument("names", nargs="+", metavar="NAME")

    c = command("check", help="can each selected node trace, and in which mode (runs a short trace)")
    selection(c)
    c.add_argument("--duration", default="2m", help="the longest the nodes get to report (default 2m)")
    return parser


def plugin_version() -> str:
    """The installed version: the whole project's, or the lean plugin distribution's."""
    found = package_version()
    if found != "unknown":
        return found
    try:
        return importlib.metadata.version(LEAN_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return found


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """The flags, with `namespace_rows`: the namespaces whose rows the tables show (None: all)."""
    ns = build_parser().parse_args(argv)
    if ns.all_namespaces and ns.namespace:
        raise PluginError("-A/--all-namespaces and -n/--namespace: pick one", EXIT_USAGE)
    ns.namespace_rows = [ns.namespace] if ns.namespace and ns.command in ("show", "watch") else None
    return ns


COMMANDS: dict[str, Callable[[Cluster, argparse.Namespace], int]] = {
    "run": run,
    "show": show,
    "watch": watch,
    "delete": delete,
    "check": check,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        ns = parse(argv)
        return COMMANDS[ns.command](Cluster(ns.kubeconfig, ns.context, ns.operator_namespace), ns)
    except PluginError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        return 130

if __name__ == "__main__":
    sys.exit(main())
