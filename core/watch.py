"""List, then watch: the one loop that mirrors a set of API objects into memory, for the
operator (every node report, every heartbeat Lease, its agents' DaemonSets) and the agent
(its node's pods).

List once, then watch from the list's resourceVersion, resuming from the last version seen
after each server-side timeout; list again only when the watch failed or expired (410 Gone:
an ERROR event). Failures back off (retransmit_core.backoff) until a watch works again: a
list that succeeds followed by a watch that is refused (RBAC without `watch`) is a failure
that grows the pause, not a relist every second. Blocking: run it in a thread.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Iterable, Mapping, Optional

from .apierrors import describe
from .backoff import backoff_delay

log = logging.getLogger(__name__)

CHANGES = ("ADDED", "MODIFIED", "DELETED")


class WatchExpired(Exception):
    """The server ended the watch with an ERROR event (410 Gone, mostly): list again."""

    def __init__(self, status: Mapping[str, Any]) -> None:
        super().__init__(f"HTTP {status.get('code') or 0}: {status.get('message') or 'watch ended by the server'}")


def list_then_watch(
    list_objects: Callable[[], Mapping[str, Any]],
    watch_from: Callable[[Optional[str]], Iterable[Mapping[str, Any]]],
    replace: Callable[[list, Optional[str]], None],
    observe: Callable[..., None],
    stop: threading.Event,
    what: str,
    backoff: Callable[[int], float] = backoff_delay,
) -> None:
    """Mirror `what` until `stop` is set.

    list_objects(): the list as a JSON dict (items, metadata.resourceVersion);
    watch_from(version): watch events (dicts with type and raw_object) from that version;
    replace(items, version) after each list, with the list's resourceVersion (the watch
    delivers every change after it); observe(obj, deleted=...) for each change.
    """
    failures = 0
    while not stop.is_set():
        try:
            listed = list_objects()
            version = (listed.get("metadata") or {}).get("resourceVersion")
            replace(list(listed.get("items") or []), version)
            while not stop.is_set():
                for event in watch_from(version):
                    # The watch works: a later failure backs off from the start again. Not
                    # after the list alone: a watch refused at once (a 403) must back off too.
                    failures = 0
                    if stop.is_set():
                        return
                    kind = event.get("type")
                    obj = event.get("raw_object") or event.get("object") or {}
                    if kind == "ERROR":
                        raise WatchExpired(obj)
                    version = (obj.get("metadata") or {}).get("resourceVersion") or version
                    if kind in CHANGES:
                        observe(obj, deleted=kind == "DELETED")
                failures = 0   # ended by the server's timeout: resumed from `version`
        except Exception as exc:  # noqa: BLE001 - API server away, expired version: list again after a pause
            if stop.is_set():
                return
            delay = backoff(failures)
            failures += 1
            log.warning("watch of %s interrupted (%s); listing again in %.1fs", what, describe(exc), delay)
            stop.wait(delay)
