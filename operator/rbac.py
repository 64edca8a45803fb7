"""The API permissions the operator needs, and nothing more, as data.

manifests/ and the Helm chart turn these into a ClusterRole, a Role in the operator's
namespace and a Role in "default"; the cluster tests run the operator with exactly these.

Why each one:
- retransmittraces list/watch: kopf's watch of the traces. patch: kopf keeps its progress and
  diff-base in the trace's annotations (not in status, which belongs to the API).
- retransmittraces/status patch: server-side apply of the operator's status fields (the
  operator reads status from the watch, never with a GET).
- retransmittraces/finalizers update: the DaemonSet's ownerReference has blockOwnerDeletion,
  which the OwnerReferencesPermissionEnforcement admission plugin (on in OpenShift) allows
  only to who may update the owner's finalizers. The operator adds no finalizer.
- pods list/watch (all namespaces): the pod IP index for remote-side attribution.
- daemonsets get/create/patch/delete (operator namespace only): the agents. Server-side apply
  is a patch, and a patch that creates needs create too.
- events create (namespace "default" only): Events about cluster-scoped objects live there.
"""

from __future__ import annotations

from typing import Any

from .api import GROUP, PLURAL

CLUSTER_RULES: list[dict[str, Any]] = [
    {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["list", "watch", "patch"]},
    {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["patch"]},
    {"apiGroups": [GROUP], "resources": [f"{PLURAL}/finalizers"], "verbs": ["update"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
]
# In the operator's own namespace (RTRACE_NAMESPACE).
NAMESPACE_RULES: list[dict[str, Any]] = [
    {"apiGroups": ["apps"], "resources": ["daemonsets"], "verbs": ["get", "create", "patch", "delete"]},
]
# In namespace "default" (retransmit_operator.kube.EVENTS_NAMESPACE).
EVENTS_RULES: list[dict[str, Any]] = [
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
]
