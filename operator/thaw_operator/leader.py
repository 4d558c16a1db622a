"""Leader election on a coordination.k8s.io Lease: of all replicas, one acts.

The same protocol as client-go's leaderelection, kept small: the holder renews `renewTime`
every `retry_seconds`; a candidate takes the Lease over when the holder has not renewed it for
`lease_seconds` *as measured on the candidate's own clock* (it notes when it last saw the
record change, so clock skew between nodes does not matter). Every write carries the
resourceVersion it read, so two candidates never both win. A holder that cannot renew for
`lease_seconds` stops acting before anyone else may start. On shutdown the holder releases
the Lease, so a rolling restart hands over at once instead of after `lease_seconds`.

kopf's own peering is not used: with equal priorities every replica pauses, and a restarted
operator waits out its dead predecessor's record (60 s); handlers and the resync loop simply
ask `is_leader()`.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from kubernetes import client
from kubernetes.client.exceptions import ApiException

log = logging.getLogger("thaw.operator.leader")
MICRO = "%Y-%m-%dT%H:%M:%S.%fZ"


def _now_micro() -> str:
    return datetime.now(UTC).strftime(MICRO)


class LeaderElector:
    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        name: str,
        lease_seconds: float = 6.0,
        retry_seconds: float = 1.5,
        on_started_leading: Callable[[], None] | None = None,
        identity: str | None = None,
    ):
        self.coord = client.CoordinationV1Api(api)
        self.namespace, self.name = namespace, name
        self.lease_seconds, self.retry_seconds = lease_seconds, retry_seconds
        self.identity = identity or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
        self.on_started_leading = on_started_leading
        self._leading = threading.Event()
        self._stop = threading.Event()
        self._observed: tuple[str | None, str | None] = (None, None)  # (holder, renewTime) last seen
        self._observed_at = 0.0  # monotonic time the record last changed
        self._renewed_at = 0.0  # monotonic time this replica last renewed successfully
        self._thread: threading.Thread | None = None

    def is_leader(self) -> bool:
        # Stop acting as soon as the lease may have passed to someone else.
        if self._leading.is_set() and time.monotonic() - self._renewed_at > self.lease_seconds:
            self._lose("renewal overdue")
        return self._leading.is_set()

    def start(self) -> LeaderElector:
        self._thread = threading.Thread(target=self._run, name="leader-election", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop and, if leading, release the Lease so that a successor starts at once."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=self.retry_seconds + 5)
        if self._leading.is_set():
            self._leading.clear()
            try:
                lease = self.coord.read_namespaced_lease(self.name, self.namespace)
                if lease.spec.holder_identity == self.identity:
                    lease.spec.holder_identity = None
                    lease.spec.renew_time = None
                    lease.spec.acquire_time = None
                    self.coord.replace_namespaced_lease(self.name, self.namespace, lease)
                    log.info("released lease %s/%s", self.namespace, self.name)
            except ApiException as err:
                log.warning("could not release lease %s/%s: %s", self.namespace, self.name, err.reason)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.try_acquire_or_renew()
            except Exception as err:  # noqa: BLE001 - the API server may be briefly away
                log.warning("leader election: %s", err)
            self.is_leader()  # drops leadership once renewal is overdue
            self._stop.wait(self.retry_seconds)

    def _lose(self, why: str) -> None:
        if self._leading.is_set():
            self._leading.clear()
            log.warning("lost leadership of %s/%s (%s): standing by", self.namespace, self.name, why)

    def _win(self) -> None:
        self._renewed_at = time.monotonic()
        if not self._leading.is_set():
            self._leading.set()
            log.info("became leader of %s/%s as %s", self.namespace, self.name, self.identity)
            if self.on_started_leading:
                threading.Thread(target=self.on_started_leading, name="on-leading", daemon=True).start()

    def try_acquire_or_renew(self) -> bool:
        now = _now_micro()
        spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": int(round(self.lease_seconds)),
            "renewTime": now,
        }
        try:
            lease = self.coord.read_namespaced_lease(self.name, self.namespace)
        except ApiException as err:
            if err.status != 404:
                raise
            body = {"metadata": {"name": self.name, "namespace": self.namespace}, "spec": {**spec, "acquireTime": now}}
            try:
                self.coord.create_namespaced_lease(self.namespace, body)
            except ApiException as err2:
                if err2.status == 409:  # another candidate created it first
                    return False
                raise
            self._win()
            return True

        holder = lease.spec.holder_identity
        record = (holder, str(lease.spec.renew_time))
        if record != self._observed:
            self._observed, self._observed_at = record, time.monotonic()
        expired = time.monotonic() - self._observed_at > self.lease_seconds
        if holder and holder != self.identity and not expired:
            self._lose(f"held by {holder}")
            return False
        if holder != self.identity:
            spec["acquireTime"] = now
            spec["leaseTransitions"] = (lease.spec.lease_transitions or 0) + 1
        # resourceVersion makes this conditional: of two candidates, one gets 409.
        patch = {"metadata": {"resourceVersion": lease.metadata.resource_version}, "spec": spec}
        try:
            self.coord.patch_namespaced_lease(self.name, self.namespace, patch)
        except ApiException as err:
            if err.status == 409:
                self._lose("lost a race for the lease")
                return False
            raise
        self._win()
        return True
