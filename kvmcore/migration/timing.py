"""The model of time: how the guest's work and the link's sends share the clock.

* :class:`VirtualTime` (the default on the model): nothing waits.  The link sends a
  batch of pages in ``bytes / bandwidth`` seconds of virtual time, and the guest
  does, in the main thread, what it would do in those seconds at its rate.  A run
  is a function of its seed: same seed, same report.
* :class:`RealTime` (the default on ``--backend kvm``): the vCPU runs in its own
  thread on the wall clock, storing in chunks and sleeping to keep its rate, while
  the main thread gets and clears the log and copies, and sleeps to keep the link
  at its bandwidth.  Times are measured, so runs differ; ``verified`` must not.

Both offer: ``start()``, ``send(seconds)`` (the link is busy that long),
``now`` (seconds since start), ``set_throttle(pct)``, ``stop_guest()``.
"""

from __future__ import annotations

import threading
import time

from kvmcore.migration.driver import GuestDriver

TIME_MODELS = ("virtual", "real")


class VirtualTime:
    name = "virtual"

    def __init__(self, driver: GuestDriver) -> None:
        self.driver = driver
        self.now = 0.0
        self.running = False

    def start(self) -> None:
        self.running = True

    def send(self, seconds: float) -> None:
        if self.running:
            self.driver.run_for(seconds)
        self.now += seconds

    def set_throttle(self, pct: int) -> None:
        self.driver.throttle = pct

    def stop_guest(self) -> None:
        self.running = False

    def close(self) -> None:
        self.running = False


class RealTime:
    """The guest in a thread of its own; the link paced by sleeping."""

    name = "real"
    GUEST_STEP_S = 0.005   # how often the vCPU thread wakes to store what is due
    MAX_BACKLOG_S = 0.05   # a guest that falls behind does not try to catch up more

    def __init__(self, driver: GuestDriver) -> None:
        self.driver = driver
        self._t0 = time.monotonic()
        self._link = self._t0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def now(self) -> float:
        return time.monotonic() - self._t0

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._t0 = self._link = time.monotonic()
        self._thread = threading.Thread(target=self._guest, name="kvmcore-vcpu0", daemon=True)
        self._thread.start()

    def _guest(self) -> None:
        last = time.monotonic()
        try:
            while not self._stop.wait(self.GUEST_STEP_S):
                now = time.monotonic()
                self.driver.run_for(min(now - last, self.MAX_BACKLOG_S))
                last = now
        except BaseException as exc:  # reported by the main thread
            self._error = exc

    def send(self, seconds: float) -> None:
        """The link cannot bank idle time: a send starts now or when the last ends."""
        self._link = max(self._link, time.monotonic()) + seconds
        delay = self._link - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        self._check()

    def set_throttle(self, pct: int) -> None:
        self.driver.throttle = pct

    def stop_guest(self) -> None:
        """Stop the vCPU: its thread finishes the stores in hand and ends."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._check()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _check(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
