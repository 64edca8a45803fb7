"""A pod spec as kubelet reads it, without I/O: a container's argv, environment and working
directory (downward API, ConfigMap/Secret references and $(VAR) expansion resolved), and
its named ports. The node simulator's pod worker feeds these with what it looked up."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

# (name, optional) -> the object's data; raises when it is missing and not optional.
DataLookup = Callable[[str, bool], Mapping[str, str]]

_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def _no_objects(name: str, optional: bool) -> Mapping[str, str]:
    if optional:
        return {}
    raise LookupError(f"{name}: no ConfigMaps or Secrets were given")


@dataclass(frozen=True)
class PodContext:
    """What a pod's containers see besides their own spec.

    pod: the Pod object (metadata.name, namespace, uid; spec). pod_ips: podIP first, empty
    before the pod has a network; a hostNetwork pod has its node's. host_ips: the node's.
    path, home: $PATH and $HOME of every container. apiserver_service: the `kubernetes`
    Service's (ClusterIP, port), exported as KUBERNETES_SERVICE_HOST/PORT. kubeconfig: the
    pod's service account kubeconfig ($KUBECONFIG). config_maps, secrets: look-ups of the
    pod's namespace (Secret data decoded)."""

    pod: dict
    node_name: str
    pod_ips: list[str]
    host_ips: list[str]
    path: str
    home: str
    apiserver_service: Optional[tuple[str, int]] = None
    kubeconfig: Optional[Path] = None
    config_maps: DataLookup = field(default=_no_objects)
    secrets: DataLookup = field(default=_no_objects)

    @property
    def host_network(self) -> bool:
        return bool(self.pod["spec"].get("hostNetwork"))


def expand(value: str, env: Mapping[str, str]) -> str:
    """kubelet's $(VAR) expansion: known names are replaced, $$ escapes, others stay."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return _VAR_REF.sub(sub, value)


def field_path(pod: dict, path: str, sandbox_ips: list[str], host_ips: list[str]) -> str:
    """A downward-API fieldRef's value for `pod`."""
    meta, spec = pod["metadata"], pod["spec"]
    m = re.match(r"metadata\.(labels|annotations)\['(.+)'\]$", path)
    if m:
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    simple = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta["uid"],
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": sandbox_ips[0] if sandbox_ips else "",
        "status.podIPs": ",".join(sandbox_ips),
        "status.hostIP": host_ips[0],
        "status.hostIPs": ",".join(host_ips),
    }
    if path not in simple:
        raise ValueError(f"fieldRef {path!r} is not supported by the node simulator")
    return simple[path]


def container_env(spec: dict, ctx: PodContext) -> dict[str, str]:
    """The container's environment: the node's basics, then envFrom, then env in order
    (a later entry may use $(an earlier one))."""
    env: dict[str, str] = {
        "PATH": ctx.path,
        # A hostNetwork pod has its node's hostname (no UTS namespace here: `hostname` says the host's).
        "HOSTNAME": ctx.node_name if ctx.host_network else ctx.pod["metadata"]["name"],
        "HOME": ctx.home,
    }
    if ctx.apiserver_service:
        host, port = ctx.apiserver_service
        env["KUBERNETES_SERVICE_HOST"], env["KUBERNETES_SERVICE_PORT"] = host, str(port)
    if ctx.kubeconfig:
        env["KUBECONFIG"] = str(ctx.kubeconfig)
    for src in spec.get("envFrom") or []:
        prefix = src.get("prefix", "")
        if "configMapRef" in src:
            data = ctx.config_maps(src["configMapRef"]["name"], src["configMapRef"].get("optional", False))
        else:
            data = ctx.secrets(src["secretRef"]["name"], src["secretRef"].get("optional", False))
        env.update({prefix + k: v for k, v in data.items()})
    for var in spec.get("env") or []:
        name = var["name"]
        if "valueFrom" not in var:
            env[name] = expand(var.get("value", ""), env)
            continue
        ref = var["valueFrom"]
        if "fieldRef" in ref:
            env[name] = field_path(ctx.pod, ref["fieldRef"]["fieldPath"], ctx.pod_ips, ctx.host_ips)
        elif "configMapKeyRef" in ref or "secretKeyRef" in ref:
            kind, read = ("configmap", ctx.config_maps) if "configMapKeyRef" in ref else ("secret", ctx.secrets)
            r = ref["configMapKeyRef"] if kind == "configmap" else ref["secretKeyRef"]
            data = read(r["name"], r.get("optional", False))
            if r["key"] in data:
                env[name] = data[r["key"]]
            elif not r.get("optional"):
                raise ValueError(f"{kind} {r['name']} has no key {r['key']}")
        elif "resourceFieldRef" in ref:
            r = ref["resourceFieldRef"]
            res = spec.get("resources") or {}
            kind, _, what = r["resource"].partition(".")
            env[name] = str((res.get(kind) or {}).get(what, "0"))
    return at_host_paths(env, moved_host_paths(ctx.pod, spec))


def moved_host_paths(pod: dict, spec: dict) -> dict[str, str]:
    """mountPath -> host path of the container's hostPath mounts that put the host's folder
    somewhere else (e.g. the host's /proc at /host/proc)."""
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["spec"].get("volumes") or [] if "hostPath" in v}
    moved = {}
    for mount in spec.get("volumeMounts") or []:
        path = host_paths.get(mount["name"])
        if path is not None and path.rstrip("/") != mount["mountPath"].rstrip("/"):
            moved[mount["mountPath"].rstrip("/")] = path.rstrip("/") or "/"
    return moved


def at_host_paths(env: dict[str, str], moved: Mapping[str, str]) -> dict[str, str]:
    """The environment with every value naming a moved mount (or a path below it) pointing at
    the host's folder instead. The simulator runs a container as a host process with no mount
    namespace of its own, so a mount at another path does not exist; a container that is told
    through its environment where a mount is (the agent's RTRACE_HOST_PROC) then reads the
    host's folder itself, which is what the mount shows in a real container. Paths in the
    command line or in files are not translated."""
    def mapped(value: str) -> str:
        for mount_path, host_path in moved.items():
            if value == mount_path or value.startswith(mount_path + "/"):
                return host_path + value[len(mount_path):]
        return value
    return {name: mapped(value) for name, value in env.items()}


def container_command(spec: dict, env: Mapping[str, str], image_entrypoints: Mapping[str, list[str]],
                      default_cwd: str) -> tuple[list[str], str]:
    """The container's argv (command + args, $(VAR) expanded with `env`) and working
    directory. Without `command` the image's entry in `image_entrypoints` runs: the
    simulator has no images."""
    command = list(spec.get("command") or [])
    if not command:
        command = list(image_entrypoints.get(spec.get("image", ""), []))
    if not command:
        raise ValueError(
            f"container {spec['name']} has no command and image {spec.get('image')!r} has no "
            "entrypoint in NodeSimulator.image_entrypoints: the simulator cannot run images")
    argv = [expand(a, env) for a in command + list(spec.get("args") or [])]
    return argv, spec.get("workingDir") or default_cwd


def container_path(spec: dict, path: str, image_bins: Mapping[str, str]) -> str:
    """$PATH of a container: the folder `image_bins` names for its image first, then `path`.
    The simulator has no images; this is how a test makes a container of a given image run
    another build of the project (an older release's console scripts) by the same command."""
    folder = image_bins.get(spec.get("image", ""))
    return f"{folder}:{path}" if folder else path


def container_port(spec: dict, port: int | str) -> int:
    """A probe's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for p in spec.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    raise ValueError(f"container {spec['name']} has no port named {port}")


def granted_capabilities(spec: dict, withheld: Iterable[str] = ()) -> Optional[list[str]]:
    """The capabilities a container's process gets, as a runtime grants them: None (the
    simulator's own, root's) for a privileged container or one that does not drop ALL;
    otherwise exactly those it adds, less `withheld` (a runtime that does not grant some to
    unprivileged containers). Only the "drop ALL, add a few" shape is modelled: it is the
    one the operator renders for its capabilities agents."""
    context = spec.get("securityContext") or {}
    capabilities = context.get("capabilities") or {}
    if context.get("privileged") or "ALL" not in (capabilities.get("drop") or []):
        return None
    skip = {name.upper() for name in withheld}
    return [name.upper() for name in capabilities.get("add") or [] if name.upper() not in skip]


def with_capabilities(argv: list[str], capabilities: Optional[list[str]]) -> list[str]:
    """argv run with only `capabilities` (its bounding set, hence a root process's
    effective set after exec); as is for None. Capabilities the host's bounding set lacks
    stay absent, as runc_capfilter.py does on the real node."""
    if capabilities is None:
        return argv
    keep = "".join(f",+{name.lower()}" for name in capabilities)
    return ["setpriv", f"--bounding-set=-all{keep}", "--inh-caps=-all", "--", *argv]
