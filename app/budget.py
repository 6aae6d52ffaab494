"""The memory budget: requests are admitted by the bytes they will hold, not only by their count.

``MEMORY_BUDGET_MB`` is what the whole process may use (RSS). Once the model is loaded and warmed
up, the process's peak RSS so far (which includes a forward pass of the largest batch of windows)
is the baseline; what remains is shared by the requests in flight. Before a request's body is
read it reserves what it will hold, estimated from ``Content-Length``: a fixed overhead, plus the
16 kHz mono float32 waveform(s) the body can decode to (at most ``MAX_DURATION_S`` per clip), twice
(the pieces of a streamed decode and the copy that joins them). A request that does not fit
beside the others gets ``503`` + ``Retry-After`` at once; one that could never fit, even alone,
``413``. Decoding streams (``model.audio.decode_mono``) and reports what it keeps: a clip that
decodes to more than its estimate (a compressed body) must grow its reservation as it goes, or
stop. Once decoded, the reservation shrinks to what the request still holds.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path

log = logging.getLogger(__name__)

MIB = 1024 * 1024
DEFAULT_BUDGET_MB = 4096  # with no container limit, and at most this share of the machine's RAM:
LIMIT_SHARE = 0.85  # of a container's memory limit (the rest: page cache, the runtime, slack)
REQUEST_OVERHEAD = 8 * MIB  # parsing, an in-memory spool of up to 1 MiB per part, decoder state
GROW_STEP = 4 * MIB  # a growing reservation asks for at least this much more at a time
CGROUP_FILES = (
    Path("/sys/fs/cgroup/memory.max"),  # cgroup v2
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),  # cgroup v1
)


def container_memory_limit() -> int | None:
    """The cgroup memory limit in bytes, or None when there is none (or it is above the RAM)."""
    physical = physical_memory()
    for path in CGROUP_FILES:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and (physical is None or int(text) < physical):
            return int(text)
    return None


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def default_budget_mb() -> int:
    """85 % of the container's memory limit, else 4096 MB (or 85 % of the RAM when that is less)."""
    limit = container_memory_limit()
    if limit is not None:
        return int(limit * LIMIT_SHARE / MIB)
    physical = physical_memory()
    if physical is not None:
        return min(DEFAULT_BUDGET_MB, int(physical * LIMIT_SHARE / MIB))
    return DEFAULT_BUDGET_MB


def _status_kb(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(m.group(1)) if m else None


def rss_bytes() -> int | None:
    """This process's resident set now (Linux), else None."""
    kb = _status_kb("VmRSS")
    return None if kb is None else kb * 1024


def peak_rss_bytes() -> int | None:
    """This process's largest resident set so far (Linux), else None."""
    kb = _status_kb("VmHWM")
    return None if kb is None else kb * 1024


class OverBudgetError(Exception):
    """A reservation does not fit: ``ever`` is False when it would fit once others finish."""

    def __init__(self, wanted: int, free: int, ever: bool) -> None:
        super().__init__(f"{wanted} bytes wanted, {free} free")
        self.wanted, self.free, self.ever = wanted, free, ever


class MemoryBudget:
    """Bytes shared by the requests in flight; thread-safe (decoding threads grow reservations)."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.baseline = 0
        self.reserved = 0
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        """What requests may hold together: the budget less the baseline."""
        return max(0, self.limit - self.baseline)

    def set_baseline(self, baseline_bytes: int) -> None:
        self.baseline = baseline_bytes
        if self.capacity < REQUEST_OVERHEAD * 4:
            log.warning(
                "memory budget %d MB leaves %d MB beside the %d MB the loaded model takes: most uploads "
                "will be refused (raise MEMORY_BUDGET_MB)",
                self.limit // MIB,
                self.capacity // MIB,
                baseline_bytes // MIB,
            )

    def take(self, n: int) -> None:
        """Reserve ``n`` bytes or raise :class:`OverBudgetError`."""
        with self._lock:
            free = self.capacity - self.reserved
            if n > free:
                raise OverBudgetError(n, free, ever=n > self.capacity)
            self.reserved += n

    def give(self, n: int) -> None:
        with self._lock:
            self.reserved = max(0, self.reserved - n)

    def reservation(self, n: int) -> Reservation:
        self.take(n)
        return Reservation(self, n)


class Reservation:
    """One request's share. Decoders ``use`` bytes as they keep them and ``free`` them when they
    let go; using more than was granted grows the grant (or raises :class:`OverBudgetError`)."""

    def __init__(self, budget: MemoryBudget, granted: int) -> None:
        self.budget = budget
        self.granted = granted
        self.used = 0
        self._lock = threading.Lock()
        self._closed = False

    def use(self, n: int) -> None:
        with self._lock:
            if self._closed:
                return
            need = self.used + n + REQUEST_OVERHEAD - self.granted
            if need > 0:
                more = max(need, GROW_STEP)
                try:
                    self.budget.take(more)
                except OverBudgetError:
                    self.budget.take(need)  # the least that will do
                    more = need
                self.granted += more
            self.used += n

    def free(self, n: int) -> None:
        with self._lock:
            self.used = max(0, self.used - n)

    def shrink(self) -> None:
        """Hand back what was granted beyond what is used now (and the fixed overhead)."""
        with self._lock:
            if self._closed:
                return
            extra = self.granted - (self.used + REQUEST_OVERHEAD)
            if extra > 0:
                self.granted -= extra
                self.budget.give(extra)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self.budget.give(self.granted)
                self.granted = 0
