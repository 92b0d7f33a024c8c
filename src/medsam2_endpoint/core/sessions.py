"""The one session store of a worker: leased interactive sessions (3D Slicer) and held volumes (`volume_id`).

Leases. A client claims a lease (a random token) and names it on every later request. A lease ends when it is
released, when no real action (an upload, an interaction) came for `idle_s`, or when nothing at all (not
even a heartbeat) came for `liveness_s`. The store caps the number of leases and the bytes their
payloads hold; a claim or an upload that does not fit is refused with `Busy` (503 + Retry-After), a
lease it does not hold with `LeaseGone` (410). Each lease has its own lock: one client's requests run one
at a time, different clients' concurrently. Nothing of one lease is reachable from another's token.

Held volumes. The JSON route keeps each decoded volume under its `volume_id` (its content hash), so a
correction round needs no upload. They are a bounded LRU in bytes of their own (`held_bytes`,
MEDSAM2_HELD_VOLUMES_MB): a client can always send a volume again (409 `volume_not_held`), a lease's
state it cannot, so held volumes never take room from leases. Each worker process has its own store, so
behind a load balancer a request may reach a worker that does not hold the volume.
"""

from __future__ import annotations

import hmac
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from medsam2_endpoint.base.errors import Busy, LeaseGone, PayloadTooLarge, VolumeNotHeld
from medsam2_endpoint.base.log import log
from medsam2_endpoint.base.lru import ByteLRU
from medsam2_endpoint.core.settings import Settings
from medsam2_endpoint.io.volume import Volume


class Sized(Protocol):
    @property
    def nbytes(self) -> int: ...


P = TypeVar("P", bound=Sized)


@dataclass(frozen=True)
class SessionLimits:
    max_sessions: int = 4
    max_bytes: int = 2048 * 1024 * 1024
    idle_s: float = 600.0  # no upload or interaction for this long: reaped
    liveness_s: float = 60.0  # no request at all (heartbeats count) for this long: reaped
    retry_after_s: float = 30.0
    held_bytes: int = 0  # volumes held by `volume_id`, all together; 0 holds none

    @classmethod
    def of(cls, settings: Settings) -> SessionLimits:
        return cls(max_sessions=settings.nninteractive_max_sessions, max_bytes=settings.nninteractive_max_mb * 2**20,
                   idle_s=settings.nninteractive_idle_s, liveness_s=settings.nninteractive_liveness_s,
                   retry_after_s=settings.retry_after_s, held_bytes=settings.held_volumes_mb * 2**20)


@dataclass
class Lease(Generic[P]):
    token: str
    payload: P
    last_action: float
    last_seen: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    busy: int = 0  # requests inside `use` now: a lease in use is never reaped under them


class SessionStore(Generic[P]):
    def __init__(self, limits: SessionLimits, make: Callable[[], P], *, clock: Callable[[], float] = time.monotonic,
                 what: str = "session") -> None:
        self.limits = limits
        self._make = make
        self._clock = clock
        self._what = what
        self._leases: dict[str, Lease[P]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None
        self._volumes = ByteLRU(limits.held_bytes)

    # ------------------------------------------------------------ leases

    def claim(self) -> Lease[P]:
        """A new lease with a fresh payload, or Busy when `max_sessions` are held."""
        self.reap()
        with self._lock:
            if len(self._leases) >= self.limits.max_sessions:
                raise self._full(f"all {self.limits.max_sessions} {self._what}s of this server are in use")
            now = self._clock()
            lease = Lease(secrets.token_urlsafe(24), self._make(), now, now)
            self._leases[lease.token] = lease
        log.info("%s claimed (%d of %d held)", self._what, len(self._leases), self.limits.max_sessions)
        return lease

    def get(self, token: str | None, *, action: bool = True) -> Lease[P]:
        """The lease `token` names (LeaseGone when none); `action` refreshes its idle timer, any call its liveness."""
        self.reap()
        with self._lock:
            lease = self._find(token)
            now = self._clock()
            lease.last_seen = now
            if action:
                lease.last_action = now
            return lease

    @contextmanager
    def use(self, token: str | None, *, action: bool = True) -> Iterator[P]:
        """The lease's payload, its lock held (one request of a client at a time); never reaped meanwhile."""
        lease = self.get(token, action=action)
        with self._lock:
            lease.busy += 1
        try:
            with lease.lock:
                if self._leases.get(lease.token) is not lease:  # released while this request waited for the lock
                    raise self._gone()
                yield lease.payload
        finally:
            with self._lock:
                lease.busy -= 1
                lease.last_seen = self._clock()
                if action:
                    lease.last_action = lease.last_seen

    def release(self, token: str | None) -> None:
        with self._lock:
            lease = self._find(token)
            del self._leases[lease.token]
        log.info("%s released (%d held)", self._what, len(self._leases))

    def holds(self, payload: P) -> bool:
        """Whether a lease still holds `payload` (not released, reaped or closed); for work done on its behalf
        outside its requests."""
        with self._lock:
            return any(lease.payload is payload for lease in self._leases.values())

    def remaining_s(self, lease: Lease[P]) -> float:
        """Seconds until the idle timeout reaps the lease (heartbeats do not extend it)."""
        return max(0.0, self.limits.idle_s - (self._clock() - lease.last_action))

    # ------------------------------------------------------------ bytes

    def held_bytes(self, *, besides: P | None = None) -> int:
        with self._lock:
            return sum(lease.payload.nbytes for lease in self._leases.values() if lease.payload is not besides)

    def make_room(self, payload: P, nbytes: int, *, field_name: str) -> None:
        """Refuse before allocating when `payload` would hold `nbytes` beyond what the other leases leave free:
        PayloadTooLarge when it exceeds the whole cap, Busy (503, retry later) when the others hold too much."""
        cap = self.limits.max_bytes
        if nbytes > cap:
            raise PayloadTooLarge(
                f"{field_name}: this {self._what} would hold {nbytes / 2**20:.0f} MiB, over the cap of {cap / 2**20:.0f} MiB "
                "for all sessions together (MEDSAM2_NNINTERACTIVE_MAX_MB); send a smaller volume (crop or resample it)",
                detail={"bytes": nbytes, "limit": cap})
        self.reap()
        others = self.held_bytes(besides=payload)
        if others + nbytes > cap:
            raise self._full(f"{field_name}: the other sessions hold {others / 2**20:.0f} MiB of the "
                             f"{cap / 2**20:.0f} MiB cap; this volume needs {nbytes / 2**20:.0f} MiB")

    # ------------------------------------------------------------ held volumes (the JSON route's volume_id)

    def hold(self, volume: Volume) -> str:
        """Keep `volume` (least recently used ones make room); its volume_id."""
        volume_id = volume.content_id()
        self._volumes.put(volume_id, volume)
        return volume_id

    def held(self, volume_id: str, *, field: str) -> Volume:
        """The volume `volume_id` names; VolumeNotHeld (409) when this worker does not hold it."""
        volume: Volume | None = self._volumes.get(volume_id)
        if volume is None:
            raise VolumeNotHeld(
                f"{field}: this worker does not hold volume {volume_id[:64]} (evicted, restarted, or another worker); "
                "send nii_image again"
            )
        return volume

    def held_volumes(self) -> int:
        return len(self._volumes)

    # ------------------------------------------------------------ reaping

    def reap(self) -> int:
        """End every lease past its idle or liveness timeout (not while one of its requests runs). How many."""
        now = self._clock()
        with self._lock:
            gone = [t for t, lease in self._leases.items() if not lease.busy and (
                now - lease.last_action > self.limits.idle_s or now - lease.last_seen > self.limits.liveness_s)]
            for token in gone:
                del self._leases[token]
        if gone:
            log.info("%s reaped: %d (idle over %gs or silent over %gs); %d held", self._what, len(gone),
                     self.limits.idle_s, self.limits.liveness_s, len(self._leases))
        return len(gone)

    def start_reaper(self, interval_s: float | None = None) -> None:
        """A daemon thread that reaps every `interval_s` (default: a quarter of the liveness timeout), so an
        abandoned session's memory goes back even when no other request comes."""
        if self._reaper is not None:
            return
        every = interval_s or max(0.5, min(self.limits.idle_s, self.limits.liveness_s) / 4)

        def loop() -> None:
            while not self._stop.wait(every):
                self.reap()

        self._reaper = threading.Thread(target=loop, name=f"{self._what}-reaper", daemon=True)
        self._reaper.start()

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self._leases.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._leases)

    # ------------------------------------------------------------ helpers

    def _find(self, token: str | None) -> Lease[P]:
        """The lease of `token` (the caller holds `_lock`); compared in constant time."""
        if token:
            for known, lease in self._leases.items():
                if hmac.compare_digest(known.encode(), token.encode()):
                    return lease
        raise self._gone()

    def _gone(self) -> LeaseGone:
        return LeaseGone(f"X-Lease-Token: this server holds no such {self._what} (released, or reaped after "
                         f"{self.limits.idle_s:g} s idle / {self.limits.liveness_s:g} s without a request); reconnect")

    def _full(self, why: str) -> Busy:
        retry = max(1, math.ceil(self.limits.retry_after_s))
        return Busy(f"{why}; retry in {retry} s, or ask the operator to raise MEDSAM2_NNINTERACTIVE_MAX_SESSIONS / _MAX_MB",
                    detail={"retry_after_s": retry})
