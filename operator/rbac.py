"""The API permissions the operator and the agents need, and nothing more, as data.

manifests/ and the Helm chart turn these into ClusterRoles, Roles in the operator's
namespace and a Role in "default"; a chart test checks they grant exactly these, and the
cluster tests run the operator with exactly these.

Why each one:
- retransmittraces list/watch: kopf's watch of the traces. patch: kopf keeps its progress and
  diff-base in the trace's annotations (not in status, which belongs to the API).
- retransmittraces/status patch: server-side apply of the operator's status fields (the
  operator reads status from the watch, never with a GET).
- retransmittraces/finalizers update: the DaemonSet's ownerReference has blockOwnerDeletion,
  which the OwnerReferencesPermissionEnforcement admission plugin (on in OpenShift) allows
  only to who may update the owner's finalizers. The operator adds no finalizer.
- pods list/watch (all namespaces): the pod IP index for remote-side attribution, and which
  nodes run an agent of which trace.
- nodes list/watch: which Linux nodes a trace does not reach and why (placement.coverage), and
  node addresses for naming remote ends (remotenames.py).
- services list/watch (all namespaces): naming remote ends that are a Service's address or
  NodePort (remotenames.py).
- daemonsets get/create/patch/delete (operator namespace only): the agents. Server-side apply
  is a patch, and a patch that creates needs create too; so is writing the cluster's agent
  count on each (retransmit.dev/cluster-agents). list/watch: the one label-selected watch of
  the agents' DaemonSets (daemonsets.py), which each pass reads (their status, the slots in
  use: slots.py) instead of a GET per trace; get and list: the same reads while that watch
  has not listed yet (operator start, a new leadership term).
- retransmitnodereports list/watch (operator namespace only): the one label-selected watch
  of the nodes' reports. retransmitnodereports/status patch: marking reports of nodes that
  left the trace (server-side apply).
- leases list/watch (coordination.k8s.io, operator namespace only): the one label-selected
  watch of the reports' heartbeat Leases (retransmit_core.schedule).
- leases create, and get/update of the one named retransmit-operator-leader (operator
  namespace only): leader election among the operator's replicas (leader.py). create cannot
  be limited to a name (the name is in the body), get and update are.
- events create (namespace "default" only): Events about cluster-scoped objects live there.
"""

from __future__ import annotations

from typing import Any

from retransmit_core.api import GROUP, PLURAL, REPORT_PLURAL
from retransmit_core.naming import LEADER_LEASE, LEASE_GROUP, LEASE_PLURAL

CLUSTER_RULES: list[dict[str, Any]] = [
    {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["list", "watch", "patch"]},
    {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["patch"]},
    {"apiGroups": [GROUP], "resources": [f"{PLURAL}/finalizers"], "verbs": ["update"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "watch"]},
    {"apiGroups": [""], "resources": ["services"], "verbs": ["list", "watch"]},
]
# In the operator's own namespace (RTRACE_NAMESPACE).
NAMESPACE_RULES: list[dict[str, Any]] = [
    {"apiGroups": ["apps"], "resources": ["daemonsets"], "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    {"apiGroups": [GROUP], "resources": [REPORT_PLURAL], "verbs": ["list", "watch"]},
    {"apiGroups": [GROUP], "resources": [f"{REPORT_PLURAL}/status"], "verbs": ["patch"]},
    {"apiGroups": [LEASE_GROUP], "resources": [LEASE_PLURAL], "verbs": ["list", "watch"]},
    {"apiGroups": [LEASE_GROUP], "resources": [LEASE_PLURAL], "verbs": ["create"]},
    {"apiGroups": [LEASE_GROUP], "resources": [LEASE_PLURAL], "verbs": ["get", "update"],
     "resourceNames": [LEADER_LEASE]},
]
# In namespace "default" (retransmit_operator.kube.EVENTS_NAMESPACE).
EVENTS_RULES: list[dict[str, Any]] = [
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
]

# The agents. Cluster-wide: only the pods of their node (listed and watched with fieldSelector
# spec.nodeName; RBAC cannot express field selectors), for local-side attribution.
AGENT_CLUSTER_RULES: list[dict[str, Any]] = [
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
]
# In the operator's namespace (where the agents run): their node's report and its heartbeat
# Lease. get (the restart baseline), create (the first time), patch (server-side apply of the
# report, the Lease's renewTime). Which ones: the node-report guard admission policy allows
# only the agent's own node's. daemonsets get: the agent's own DaemonSet's
# desiredNumberScheduled and the cluster's agent count on it, which stretch its report period
# and heartbeat on big clusters.
AGENT_NAMESPACE_RULES: list[dict[str, Any]] = [
    {"apiGroups": [GROUP], "resources": [REPORT_PLURAL], "verbs": ["get", "create", "patch"]},
    {"apiGroups": [LEASE_GROUP], "resources": [LEASE_PLURAL], "verbs": ["get", "create", "patch"]},
    {"apiGroups": ["apps"], "resources": ["daemonsets"], "verbs": ["get"]},
]
