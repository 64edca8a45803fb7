"""Pure readers of the API objects the operator watches: the operator-owned part of a
trace's status, which of two versions of an object is newer, and how many nodes a DaemonSet
wants once its controller has seen the current generation. No I/O, no state.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import ValidationError

from .conditions import OperatorStatus

OPERATOR_FIELDS = ("phase", "observedGeneration", "startTime", "completionTime", "conditions", "summary", "nodes")


def operator_status(status: dict[str, Any]) -> Optional[OperatorStatus]:
    """The operator-owned part of a trace's status, or None when there is none (or it is unusable)."""
    owned = {k: status[k] for k in OPERATOR_FIELDS if k in status}
    if "phase" not in owned:
        return None
    try:
        return OperatorStatus.model_validate(owned)
    except ValidationError:
        return None


def newer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """a is a later version of the same object than b. resourceVersions are opaque; etcd's
    are increasing integers, and anything else (or another uid) counts as not newer."""
    ma, mb = a.get("metadata") or {}, b.get("metadata") or {}
    if ma.get("uid") != mb.get("uid"):
        return False
    try:
        return int(ma.get("resourceVersion")) > int(mb.get("resourceVersion"))
    except (TypeError, ValueError):
        return False


def desired_nodes(daemonset: Optional[dict[str, Any]]) -> Optional[int]:
    """desiredNumberScheduled once the DaemonSet controller has seen the current generation."""
    if not daemonset:
        return None
    status = daemonset.get("status") or {}
    if (status.get("observedGeneration") or 0) < (daemonset.get("metadata") or {}).get("generation", 0):
        return None
    return int(status.get("desiredNumberScheduled") or 0)
