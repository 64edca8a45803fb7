"""What the operator knows of its agents' DaemonSets (every trace's, in its namespace): a cache
fed by one label-selected watch (retransmit_operator.kube.KubeApi.watch_daemonsets) and by
the operator's own writes, read by each pass instead of a GET per trace.

Two sources, one order. The watch lags behind the operator's writes, so:
- an event older than what a write returned does not bring the older object back
  (resourceVersion, objects.newer);
- an event of a DaemonSet the operator deleted does not bring it back (its uid is remembered
  until the watch or a list shows it gone);
- a list does not drop what the operator wrote after the list's resourceVersion: the watch
  that follows the list delivers that object's next change, or its deletion.
"""

from __future__ import annotations

import threading
from typing import Any, Iterable, Optional

from .objects import newer, version_number


def _name(obj: dict[str, Any]) -> str:
    return (obj.get("metadata") or {}).get("name", "")


def _uid(obj: dict[str, Any]) -> Optional[str]:
    return (obj.get("metadata") or {}).get("uid")


def _written_after(obj: dict[str, Any], listed: Optional[str]) -> bool:
    mine, at = version_number((obj.get("metadata") or {}).get("resourceVersion")), version_number(listed)
    return mine is not None and at is not None and mine > at


class DaemonSetCache:
    """The agents' DaemonSets by name; thread-safe (the watch runs in a thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[str, dict[str, Any]] = {}
        self._deleted: set[str] = set()   # uids the operator deleted, until seen gone
        self.events = 0   # watch events and lists applied: tests see the watch working
        # Set by the first list: before it, an absent DaemonSet means "not seen yet", and
        # readers ask the API server instead.
        self.synced = threading.Event()

    # ------------------------------------------------------------ the watch

    def replace(self, objs: Iterable[dict[str, Any]], version: Optional[str] = None) -> None:
        """After a (re)list at resourceVersion `version`: these, but for what the operator
        wrote after it."""
        objs = list(objs)
        with self._lock:
            listed = [obj for obj in objs if _uid(obj) not in self._deleted]
            kept = {name: obj for name, obj in self._objects.items() if _written_after(obj, version)}
            self._objects = {**{_name(obj): obj for obj in listed}, **kept}
            # A deleted uid the list no longer shows sends no more events.
            present = {_uid(obj) for obj in objs}
            self._deleted &= present
            self.events += 1
            self.synced.set()

    def observe(self, obj: dict[str, Any], deleted: bool = False) -> None:
        """One watch event."""
        name, uid = _name(obj), _uid(obj)
        with self._lock:
            self.events += 1
            known = self._objects.get(name)
            if deleted:
                self._deleted.discard(uid)
                if known is not None and _uid(known) == uid:
                    del self._objects[name]
                return
            if uid in self._deleted or (known is not None and newer(known, obj)):
                return
            self._objects[name] = obj

    # ------------------------------------------------------------ the operator's writes

    def record(self, obj: dict[str, Any]) -> None:
        """A DaemonSet as the API server returned it to the operator (a write's response, a GET)."""
        with self._lock:
            known = self._objects.get(_name(obj))
            if known is not None and newer(known, obj):
                return
            self._deleted.discard(_uid(obj))
            self._objects[_name(obj)] = obj

    def forget(self, name: str) -> None:
        """The operator deleted this DaemonSet (or found it gone)."""
        with self._lock:
            known = self._objects.pop(name, None)
            uid = _uid(known) if known is not None else None
            if uid is not None:
                self._deleted.add(uid)

    def reset(self) -> None:
        """Forget everything (a new leadership term: another replica may have written since);
        readers ask the API server until the next list."""
        with self._lock:
            self.synced.clear()
            self._objects, self._deleted = {}, set()

    # ------------------------------------------------------------ readers

    def get(self, name: str) -> Optional[dict[str, Any]]:
        with self._lock:
            return self._objects.get(name)

    def all(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._objects.values())
