"""A node simulator: plays kubelet (plus a bridge CNI plugin and kube-proxy for the
`kubernetes` Service) for Node objects it registers, so pods bound to them really run.

What it does for each simulated node (node-a, node-b, ...):
  - registers the Node (labels kubernetes.io/os=linux, kubernetes.io/hostname, ...; podCIDRs
    198.18.<16*slot+i>.0/24 and fd00:0:<slot+1>:<i>::/64) and keeps it Ready: a Lease in
    kube-node-lease renewed every 10 s, node status re-posted every 30 s;
  - watches pods whose spec.nodeName is one of its nodes and, for each:
      * hostNetwork: runs it in the host's network namespace; status.podIP = the node's IP;
      * otherwise: a network namespace of its own (unique name), a veth into a host bridge,
        an IPv4 and an IPv6 address from the node's pod CIDRs, reported as status.podIP/podIPs.
        All pods of one simulator share the bridge (as with the CNI bridge plugin), so pods
        on different simulated nodes reach each other directly;
      * asks the TokenRequest API for a token bound to the pod (audience: the apiserver's)
        and hands it to the process as a kubeconfig in the pod's private dir ($KUBECONFIG),
        so RBAC applies as in a real pod; the token, ca.crt and namespace files are in
        <pod dir>/serviceaccount/ too. Pods in their own netns reach the apiserver through
        the `kubernetes` Service's ClusterIP, which the simulator proxies (kube-proxy's job);
      * runs each container's command + args as a local process (root, host paths, host
        mount namespace) with the pod's env: value, valueFrom fieldRef (metadata.name,
        metadata.namespace, metadata.uid, metadata.labels/annotations['k'], spec.nodeName,
        spec.serviceAccountName, status.podIP(s), status.hostIP(s)), configMapKeyRef,
        secretKeyRef, resourceFieldRef, envFrom; $(VAR) references expanded as kubelet does;
      * a container that drops ALL capabilities and is not privileged runs with only those it
        adds (setpriv bounding set), less the ones `withheld_capabilities[node]` names;
      * posts pod status: Pending, then Running with Ready/ContainersReady while every
        container's process is alive (and its readinessProbe, httpGet/tcpSocket/exec,
        passes when it has one), containerStatuses with restartCount and last exit;
        restarts on exit per restartPolicy with a capped backoff; Succeeded/Failed when done;
      * on deletion: SIGTERM, SIGKILL after the grace period, then removes the pod object
        (grace 0) as kubelet does, and the network namespace.
  - Each container's stdout/stderr go to <state>/pods/<namespace>_<pod>_<uid>/<container>.log
    (`NodeSimulator.log_path(...)`).

Not simulated: images (a container without `command` runs `image_entrypoints[image]` if
given, else waits with reason CreateContainerConfigError), volumes other than hostPath (paths are the host's
own; a hostPath mounted at another path exists only through the environment: a variable whose
value is the mountPath, or below it, names the host path instead, podspec.at_host_paths), liveness/startup probes, resource limits, securityContext beyond capabilities, `kubectl logs/exec` (no kubelet API).

Use it from Python (threads in this process) or from the command line:
    python -m tests.harness.nodesim --kubeconfig admin.kubeconfig --nodes node-a,node-b

Another build for an image: a container whose image has a folder in `image_bins` finds that
folder's console scripts first on its $PATH (tests/deploy/test_upgrade.py runs the release
v0.1.0's operator and agents for v0.1.0's images that way).

The package by concern: podspec (a container's argv, env and cwd from the pod spec, pure),
network (address plan, bridge and per-pod namespaces, the apiserver proxy), process (one
pod's containers as processes, probes, pod status), node (Node registration, heartbeats,
the pod watch: NodeSimulator).
"""

from .network import SimNode, release_proxy, share_proxy
from .node import NodeSimulator

__all__ = ["NodeSimulator", "SimNode", "release_proxy", "share_proxy"]
