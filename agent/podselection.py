"""Which local pods a trace keeps: `namespaces` and `podSelector` turned into the set of local
addresses the kernel program filters on. Pure; the agent's PodIndex (retransmit_core.podindex)
supplies the pods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from retransmit_core.api import KernelCheck, LabelSelector
from retransmit_core.podindex import PodFacts, PodIndex


def selector_matches(selector: Optional[LabelSelector], labels: Mapping[str, str]) -> bool:
    """metav1.LabelSelector semantics: matchLabels AND every matchExpression; None matches all."""
    if selector is None:
        return True
    for key, value in selector.match_labels.items():
        if labels.get(key) != value:
            return False
    for req in selector.match_expressions:
        present = req.key in labels
        if req.operator == "In" and not (present and labels[req.key] in req.values):
            return False
        if req.operator == "NotIn" and present and labels[req.key] in req.values:
            return False
        if req.operator == "Exists" and not present:
            return False
        if req.operator == "DoesNotExist" and present:
            return False
    return True


@dataclass(frozen=True)
class PodSelection:
    """The trace's choice of local pods: `namespaces` (empty = all) and `podSelector` (None = all)."""

    namespaces: frozenset[str] = frozenset()
    selector: Optional[LabelSelector] = None

    @property
    def selects_everything(self) -> bool:
        return not self.namespaces and (
            self.selector is None
            or (not self.selector.match_labels and not self.selector.match_expressions)
        )

    def matches(self, pod: PodFacts) -> bool:
        if self.namespaces and pod.namespace not in self.namespaces:
            return False
        return selector_matches(self.selector, pod.labels)


FILTER_CHECK = "local-IP filter"


def with_filter_check(checks: Sequence[KernelCheck], left_out: int, capacity: int) -> tuple[KernelCheck, ...]:
    """The report's kernel checks with a degraded line when selected pods' addresses did not
    fit the kernel's local-IP filter (their flows are not counted), and without one when all fit."""
    kept = tuple(c for c in checks if c.name != FILTER_CHECK)
    if left_out <= 0:
        return kept
    return kept + (KernelCheck(
        name=FILTER_CHECK, status="degraded",
        detail=f"{left_out} address(es) of selected pods do not fit the kernel's local-IP filter "
               f"({capacity} per IP family): retransmits on their connections are not counted",
        fix="select fewer pods with spec.namespaces or spec.podSelector, or split them over several traces"),)


def selected_ips(index: PodIndex, selection: PodSelection) -> Optional[frozenset[str]]:
    """Local IPs the kernel should keep, or None for no local-IP filter at all.

    hostNetwork pods are never in the set: their address is the node's, so selecting
    them would select every host-network connection of the node. Where sockets are named by
    cgroup, they are selected by their cgroups instead (socketowners.selected_cgroups).
    """
    if selection.selects_everything:
        return None
    return frozenset(ip for pod in index.pods if not pod.host_network and selection.matches(pod) for ip in pod.ips)
