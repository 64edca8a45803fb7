"""One active operator among its replicas: leader election on a coordination.k8s.io Lease,
the way client-go's leaderelection does it (kube-controller-manager, controller-runtime).

A replica acquires the Lease when nobody holds it, when it holds it already, or when the
holder has not renewed it for leaseDurationSeconds; every write carries the resourceVersion
it read, so of two replicas racing for it one wins and the other gets a conflict. The leader
renews every RETRY_SECONDS; if it cannot renew within RENEW_DEADLINE_SECONDS it stops
(the process exits and the Deployment restarts it as a standby), before any other replica
may take over at LEASE_SECONDS: two replicas never act at once. A leader that stops cleanly
releases the Lease, so a standby takes over at its next try.

The decisions are pure (`can_acquire`); `LeaderElection` is the I/O.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from datetime import datetime, timedelta, timezone
from typing import Any, Mapping, Optional, Union

from retransmit_core.naming import APP_NAME, LEADER_LEASE, micro_time

log = logging.getLogger(__name__)

LEASE_NAME = LEADER_LEASE
LEASE_SECONDS = 15
RENEW_DEADLINE_SECONDS = 10
RETRY_SECONDS = 2

StopFlag = Union[threading.Event, asyncio.Event]


def _time(text: Optional[str]) -> Optional[datetime]:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None
    except ValueError:
        return None


def can_acquire(spec: Mapping[str, Any], identity: str, now: datetime) -> bool:
    """Whether `identity` may take (or keep) a Lease with this spec at `now`."""
    holder = spec.get("holderIdentity") or ""
    if holder in ("", identity):
        return True
    renewed = _time(spec.get("renewTime")) or _time(spec.get("acquireTime"))
    duration = spec.get("leaseDurationSeconds") or LEASE_SECONDS
    return renewed is None or now >= renewed + timedelta(seconds=duration)


def held_spec(previous: Mapping[str, Any], identity: str, now: datetime) -> dict[str, Any]:
    """The Lease's spec once `identity` holds it: a new acquireTime and one more transition
    when it changes hands (`previous` empty: the Lease is new)."""
    taking = (previous.get("holderIdentity") or "") != identity
    return {
        "holderIdentity": identity,
        "leaseDurationSeconds": LEASE_SECONDS,
        "acquireTime": micro_time(now) if taking else previous.get("acquireTime") or micro_time(now),
        "renewTime": micro_time(now),
        "leaseTransitions": (previous.get("leaseTransitions") or 0) + (1 if taking and previous else 0),
    }


class LeaderElection:
    """Acquire, hold and release the operator's Lease in `namespace` as `identity`."""

    def __init__(self, api_client: Any, namespace: str, identity: str, name: str = LEASE_NAME) -> None:
        from kubernetes import client

        self._leases = client.CoordinationV1Api(api_client)
        self._serialize = api_client.sanitize_for_serialization
        self.namespace, self.identity, self.name = namespace, identity, name
        self.renewed_at: Optional[float] = None   # loop.time() of the last successful renewal

    def _read(self) -> Optional[dict[str, Any]]:
        from kubernetes.client.exceptions import ApiException

        try:
            return self._serialize(self._leases.read_namespaced_lease(self.name, self.namespace,
                                                                      _request_timeout=RENEW_DEADLINE_SECONDS))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def try_acquire_or_renew(self) -> bool:
        """One attempt (blocking I/O): True when this replica holds the Lease afterwards."""
        from kubernetes.client.exceptions import ApiException

        now = datetime.now(timezone.utc)
        try:
            lease = self._read()
            if lease is None:
                self._leases.create_namespaced_lease(self.namespace, {
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace,
                                 "labels": {"app.kubernetes.io/name": APP_NAME,
                                            "app.kubernetes.io/component": "operator"}},
                    "spec": held_spec({}, self.identity, now)}, _request_timeout=RENEW_DEADLINE_SECONDS)
                return True
            spec = lease.get("spec") or {}
            if not can_acquire(spec, self.identity, now):
                return False
            # resourceVersion in the body: a replica that wrote since our read makes this a 409.
            lease["spec"] = held_spec(spec, self.identity, now)
            self._leases.replace_namespaced_lease(self.name, self.namespace, lease,
                                                  _request_timeout=RENEW_DEADLINE_SECONDS)
            return True
        except ApiException as e:
            if e.status in (409, 404):
                return False   # another replica was quicker
            log.warning("leader election: %s %s", e.status, e.reason)
            return False
        except Exception as e:  # noqa: BLE001 - API server away: not leader this round
            log.warning("leader election: the API server did not answer (%s)", e)
            return False

    async def acquire(self, stop: StopFlag) -> bool:
        """Wait until this replica leads (True) or `stop` is set (False)."""
        announced = False
        while not stop.is_set():
            if await asyncio.to_thread(self.try_acquire_or_renew):
                self.renewed_at = asyncio.get_running_loop().time()
                log.info("leading as %s (Lease %s/%s)", self.identity, self.namespace, self.name)
                return True
            if not announced:
                log.info("standing by: another replica holds Lease %s/%s", self.namespace, self.name)
                announced = True
            await asyncio.sleep(RETRY_SECONDS)
        return False

    async def hold(self, lost: asyncio.Event) -> None:
        """Renew until cancelled; set `lost` when no renewal succeeded for RENEW_DEADLINE_SECONDS."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(RETRY_SECONDS)
            if await asyncio.to_thread(self.try_acquire_or_renew):
                self.renewed_at = loop.time()
            elif self.renewed_at is None or loop.time() - self.renewed_at >= RENEW_DEADLINE_SECONDS:
                log.error("lost leadership: Lease %s/%s not renewed for %ds; stopping", self.namespace,
                          self.name, RENEW_DEADLINE_SECONDS)
                lost.set()
                return

    def release(self) -> None:
        """Give the Lease up (a clean stop), so a standby takes over at its next try."""
        from kubernetes.client.exceptions import ApiException

        try:
            lease = self._read()
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            lease["spec"] = {**lease["spec"], "holderIdentity": "", "renewTime": None, "acquireTime": None}
            self._leases.replace_namespaced_lease(self.name, self.namespace, lease,
                                                  _request_timeout=RENEW_DEADLINE_SECONDS)
        except (ApiException, OSError) as e:   # best effort: the Lease expires anyway
            log.warning("leader election: Lease not released (%s); a standby takes over when it expires", e)
