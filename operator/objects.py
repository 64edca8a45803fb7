"""Pure readers of the API objects the operator watches: the operator-owned part of a
trace's status and which of two versions of an object is newer. No I/O, no state.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import ValidationError

from retransmit_core.api import RetransmitTraceStatus

# Every field of the trace's status is the operator's (field manager rtrace-operator).
OPERATOR_FIELDS = tuple(field.alias or name for name, field in RetransmitTraceStatus.model_fields.items())


def operator_status(status: dict[str, Any]) -> Optional[RetransmitTraceStatus]:
    """The operator-owned part of a trace's status, or None when there is none (or it is unusable)."""
    owned = {k: status[k] for k in OPERATOR_FIELDS if k in status}
    if "phase" not in owned:
        return None
    try:
        return RetransmitTraceStatus.model_validate(owned)
    except ValidationError:
        return None


def newer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """a is a later version of the same object than b. resourceVersions are opaque; etcd's
    are increasing integers, and anything else (or another uid) counts as not newer."""
    ma, mb = a.get("metadata") or {}, b.get("metadata") or {}
    if ma.get("uid") != mb.get("uid"):
        return False
    va, vb = version_number(ma.get("resourceVersion")), version_number(mb.get("resourceVersion"))
    return va is not None and vb is not None and va > vb


def version_number(value: Optional[str]) -> Optional[int]:
    """A resourceVersion as a number (etcd's are increasing integers); None when it is not one."""
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None
