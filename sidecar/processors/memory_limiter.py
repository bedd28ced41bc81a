"""The ``memory_limiter`` processor: refuse data while the process is near its memory limit.

A :class:`~sidecar.ticker.Ticker` reads the resident set size every ``check_interval``. Above the soft
limit (``limit - spike_limit``) the processor refuses everything with
``Refused("memory_limit")`` (receivers answer RESOURCE_EXHAUSTED / 429 so clients back off
and retry), and it asks Python and glibc to hand memory back. It accepts again once RSS
is below the soft limit. Checking on a timer, not per request, keeps ``consume`` at one
flag check; the pipeline's edges count what passes and what is refused.

Two things do not wait for the timer. While refusing, ``consume`` checks again (collect, trim,
read RSS) at most every ``_RECHECK`` seconds, so the limiter accepts as soon as memory is handed
back after a spike. And receivers ask :meth:`MemoryLimiter.admit` (through ``host.admission``)
before parsing a large request: one whose cost (``request_memory_factor`` x its size) does not
fit in what is left under the soft limit, counting the requests admitted and still in the
pipeline, is refused (retryable) before it costs anything more.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

from prometheus_client import Gauge
from pydantic import Field, model_validator

from sidecar.component import Component, Consumer, Kind, Refused
from sidecar.config import ConfigModel, Duration
from sidecar.registry import ALL_SIGNALS, CreateSettings, Factory
from sidecar.ticker import Ticker
from sidecar.envelope import Envelope

log = logging.getLogger(__name__)

_MIB = 1024 * 1024
#: requests below this many bytes are not measured one by one: the spike headroom covers them
ADMIT_MIN_BYTES = 256 * 1024
#: while refusing, memory is checked again at most this often (seconds)
_RECHECK = 0.1
#: gc.collect + malloc_trim at most this often outside the periodic check: a client sending refused
#: requests must not keep the collector running
_RELEASE_INTERVAL = 0.5


class MemoryLimiterConfig(ConfigModel):
    """Exactly one of ``limit_mib`` or ``limit_percentage`` (of the container's memory limit)."""

    check_interval: Duration = 1.0
    limit_mib: int | None = Field(None, gt=0)
    #: Headroom for a burst between two checks; refusing starts at limit - spike. Default: 20% of the limit.
    spike_limit_mib: int | None = Field(None, ge=0)
    limit_percentage: int | None = Field(None, gt=0, le=100)
    spike_limit_percentage: int | None = Field(None, ge=0, le=100)
    #: What a request costs in memory on its way through the pipeline, as a multiple of its encoded size.
    #: Parsing alone takes ~3x (15 MiB of spans: 47 MiB); span_metrics + tail_sampling + redaction
    #: ~12x (benchmarks/memory_spike.py --full). A request that does not fit is refused before parsing.
    request_memory_factor: float = Field(8.0, ge=1.0, le=100.0)

    @model_validator(mode="after")
    def _one_limit(self) -> "MemoryLimiterConfig":
        if self.check_interval <= 0:
            raise ValueError("check_interval must be > 0")
        if (self.limit_mib is None) == (self.limit_percentage is None):
            raise ValueError("set exactly one of limit_mib or limit_percentage")
        if self.limit_mib is not None:
            if self.spike_limit_percentage is not None:
                raise ValueError("spike_limit_percentage goes with limit_percentage; "
                                 "use spike_limit_mib with limit_mib")
            if self.spike_limit_mib is not None and self.spike_limit_mib >= self.limit_mib:
                raise ValueError(f"spike_limit_mib ({self.spike_limit_mib}) must be less than limit_mib "
                                 f"({self.limit_mib})")
        else:
            if self.spike_limit_mib is not None:
                raise ValueError("spike_limit_mib goes with limit_mib; "
                                 "use spike_limit_percentage with limit_percentage")
            if self.spike_limit_percentage is not None and self.spike_limit_percentage >= self.limit_percentage:
                raise ValueError(f"spike_limit_percentage ({self.spike_limit_percentage}) must be less than "
                                 f"limit_percentage ({self.limit_percentage})")
        return self


# --- reading memory -------------------------------------------------------------------------------

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def read_rss() -> int:
    """Resident set size of this process in bytes, from ``/proc/self/statm`` (one small read)."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE_SIZE


def _read_peak_rss() -> int:
    """Fallback where /proc is missing (macOS): the peak RSS, which only overestimates."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def total_memory(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """The memory this process may use: the cgroup (v2 ``memory.max`` or v1) limit, else physical RAM."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    root = Path(cgroup_root)
    candidates = []
    try:  # cgroup v2: our own group's memory.max (namespaced containers see "/")
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                candidates.append(root / line[3:].lstrip("/") / "memory.max")
    except OSError:
        pass
    candidates += [root / "memory.max", root / "memory" / "memory.limit_in_bytes"]
    for path in candidates:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return min(int(text), physical)  # v1 reports "unlimited" as a huge number
        if text == "max":
            return physical
    return physical


def _malloc_trim() -> Callable[[], None]:
    """glibc's ``malloc_trim(0)`` returns freed heap pages to the OS; a no-op elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


# --- the processor --------------------------------------------------------------------------------


class MemoryLimiter(Component):
    def __init__(self, settings: CreateSettings, config: MemoryLimiterConfig, next_consumer: Consumer, *,
                 rss_reader: Callable[[], int] | None = None, total_memory_bytes: int | None = None,
                 release_memory: Callable[[], None] | None = None):
        self.id = str(settings.id)
        self._next = next_consumer
        self._telemetry = settings.telemetry
        self.check_interval = config.check_interval
        if config.limit_mib is not None:
            self.limit = config.limit_mib * _MIB
            spike = config.spike_limit_mib * _MIB if config.spike_limit_mib is not None else self.limit // 5
        else:
            total = total_memory_bytes if total_memory_bytes is not None else total_memory()
            self.limit = total * config.limit_percentage // 100
            spike = (total * config.spike_limit_percentage // 100 if config.spike_limit_percentage is not None
                     else self.limit // 5)
        self.soft_limit = self.limit - spike
        if rss_reader is None:
            rss_reader = read_rss if os.path.exists("/proc/self/statm") else _read_peak_rss
        self._read_rss = rss_reader
        self._release = release_memory or _malloc_trim()
        self.refusing = False
        self.rss = 0
        self._retry_after = max(self.check_interval, 1.0)
        self._checking = threading.Lock()
        self._last_check = 0.0
        self._last_release = float("-inf")
        self._factor = config.request_memory_factor
        self._reserved = 0  # memory admitted to requests still on their way in (bytes)
        self._reserve_lock = threading.Lock()
        self._ticker = Ticker(self.check, self.check_interval, name=f"{self.id}-check")

        root = settings.telemetry.root
        root.family(Gauge, "sidecar_memory_limiter_rss_bytes", "Resident set size at the last check.",
                    ("component",)).labels(self.id).set_function(lambda: self.rss)
        root.family(Gauge, "sidecar_memory_limiter_refusing", "1 while the memory limiter refuses data.",
                    ("component",)).labels(self.id).set_function(lambda: 1.0 if self.refusing else 0.0)
        limits = root.family(Gauge, "sidecar_memory_limiter_limit_bytes",
                             "Memory limits: hard (limit) and soft (limit - spike, where refusing starts).",
                             ("component", "limit"))
        limits.labels(self.id, "hard").set(self.limit)
        limits.labels(self.id, "soft").set(self.soft_limit)

    def consume(self, envelope: Envelope) -> None:
        if self.refusing and not self._recheck():
            raise self._refusal()
        self._next.consume(envelope)

    def _refusal(self) -> Refused:
        return Refused("memory_limit", retry_after=self._retry_after,
                       message=f"memory limit reached: RSS {self.rss // _MIB} MiB >= soft limit "
                               f"{self.soft_limit // _MIB} MiB; retry later")

    def _recheck(self) -> bool:
        """While refusing: check again if the last check is older than ``_RECHECK``; True once accepting."""
        if time.monotonic() - self._last_check >= _RECHECK:
            self._recheck_now()
        return not self.refusing

    def admit(self, nbytes: int) -> Refused | None:
        """Asked by a receiver before it parses ``nbytes``: None to go ahead (then :meth:`admitted` once the
        request is handed on), or the refusal when its cost does not fit under the soft limit."""
        if self.refusing and not self._recheck():
            return self._refusal()
        if nbytes < ADMIT_MIN_BYTES:
            return None
        need = int(nbytes * self._factor)
        for attempt in (0, 1):
            rss = self._read_rss()
            with self._reserve_lock:
                if rss + self._reserved + need < self.soft_limit:
                    self._reserved += need
                    return None
                reserved = self._reserved
            if attempt == 0 and time.monotonic() - self._last_check >= _RECHECK:
                self._recheck_now(release=True)  # garbage and freed heap handed back may make room
        return Refused("memory_limit", retry_after=self._retry_after,
                       message=f"a request of {nbytes // 1024} KiB needs about {need // _MIB} MiB on its way through; "
                               f"RSS {rss // _MIB} MiB + {reserved // _MIB} MiB admitted to requests in flight, soft "
                               f"limit {self.soft_limit // _MIB} MiB; retry later or send smaller requests")

    def admitted(self, nbytes: int) -> None:
        """The request :meth:`admit` let in has been handed on (or failed): its memory shows in RSS now."""
        if nbytes >= ADMIT_MIN_BYTES:
            with self._reserve_lock:
                self._reserved = max(0, self._reserved - int(nbytes * self._factor))

    def _recheck_now(self, release: bool = False) -> None:
        if self._checking.acquire(blocking=False):
            try:
                self.check(release)
            finally:
                self._checking.release()

    def check(self, release: bool = False) -> None:
        """Sample RSS and switch modes; above the soft limit (or with ``release``), collect garbage and
        trim the heap first."""
        now = self._last_check = time.monotonic()
        rss = self._read_rss()
        if (release or rss >= self.soft_limit) and now - self._last_release >= _RELEASE_INTERVAL:
            self._last_release = now
            gc.collect()
            self._release()
            rss = self._read_rss()
        self.rss = rss
        over = rss >= self.soft_limit
        if over != self.refusing:
            if over:
                log.warning("%s: RSS %d MiB is over the soft limit %d MiB: refusing data", self.id, rss // _MIB,
                            self.soft_limit // _MIB)
            else:
                log.info("%s: RSS %d MiB is below the soft limit again: accepting data", self.id, rss // _MIB)
            self.refusing = over

    def start(self, host) -> None:
        self.check()
        self._ticker.start()
        admission = getattr(host, "admission", None)
        if admission is not None and self not in admission:
            admission.append(self)

    def shutdown(self, deadline: float) -> None:
        self._ticker.stop(min(deadline, time.monotonic() + 5.0))


FACTORY = Factory(
    type="memory_limiter",
    kind=Kind.PROCESSOR,
    config_model=MemoryLimiterConfig,
    create=lambda settings, cfg, next_consumer: MemoryLimiter(settings, cfg, next_consumer),
    signals=ALL_SIGNALS,
    telemetry=frozenset({"sidecar_memory_limiter_limit_bytes", "sidecar_memory_limiter_refusing",
                         "sidecar_memory_limiter_rss_bytes"}),
)
