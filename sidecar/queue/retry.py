"""Retry with exponential backoff, jitter and one deadline over all attempts (``retry_on_failure``).

The sender only retries :class:`~sidecar.component.RetryableError`; a
:class:`~sidecar.component.PermanentError` ends at once. A backend's own delay
(gRPC ``RetryInfo``, HTTP ``Retry-After``) is honoured when it is longer than the
backoff, as long as the wait still ends inside ``max_elapsed_time``. The clock and the
wait are injected so tests run without real sleeps, and so shutdown can interrupt a wait.
"""

from __future__ import annotations

import enum
import random
import time
from dataclasses import dataclass
from typing import Callable

from pydantic import Field, field_validator, model_validator

from sidecar.component import ExportError, PermanentError, RetryableError
from sidecar.config import ConfigModel, Duration


class RetryConfig(ConfigModel):
    """``retry_on_failure``: otelcol's keys and defaults."""

    enabled: bool = True
    initial_interval: Duration = 5.0
    randomization_factor: float = Field(0.5, ge=0.0, le=1.0)
    multiplier: float = Field(1.5, ge=1.0)
    max_interval: Duration = 30.0
    #: Give up after this long since the first attempt; 0 retries forever.
    max_elapsed_time: Duration = 300.0

    @field_validator("initial_interval")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("must be > 0")
        return v

    @model_validator(mode="after")
    def _check(self) -> "RetryConfig":
        if self.max_interval < self.initial_interval:
            raise ValueError(f"max_interval ({self.max_interval}s) must be >= initial_interval ({self.initial_interval}s)")
        return self


class Backoff:
    """The delays between attempts: initial * multiplier^n, capped, randomized by +- factor."""

    def __init__(self, cfg: RetryConfig, rand: Callable[[], float] = random.random):
        self._cfg = cfg
        self._rand = rand
        self._interval = cfg.initial_interval

    def next(self) -> float:
        interval = self._interval
        self._interval = min(interval * self._cfg.multiplier, self._cfg.max_interval)
        f = self._cfg.randomization_factor
        return interval * (1 - f + 2 * f * self._rand())


class Outcome(enum.Enum):
    EXPORTED = "exported"
    PERMANENT = "permanent_error"
    EXHAUSTED = "retries_exhausted"
    #: shutdown interrupted the wait before the next attempt
    ABORTED = "shutdown"


@dataclass
class Result:
    outcome: Outcome
    value: object = None
    error: ExportError | None = None
    attempts: int = 0


class RetrySender:
    """Runs one push until it succeeds, fails permanently, runs out of time or is aborted.

    ``wait(seconds)`` returns False when it was interrupted (shutdown); ``clock`` is monotonic seconds.
    """

    def __init__(self, cfg: RetryConfig, *, wait: Callable[[float], bool],
                 clock: Callable[[], float] = time.monotonic, rand: Callable[[], float] = random.random):
        self.cfg = cfg
        self._wait = wait
        self._clock = clock
        self._rand = rand

    def send(self, attempt: Callable[[], object],
             on_retry: Callable[[RetryableError, float], None] | None = None) -> Result:
        """Call ``attempt`` until done; ``on_retry(error, delay)`` is told about each retry before its wait."""
        cfg = self.cfg
        start = self._clock()
        backoff = Backoff(cfg, self._rand)
        attempts = 0
        while True:
            attempts += 1
            try:
                value = attempt()
            except PermanentError as e:
                return Result(Outcome.PERMANENT, error=e, attempts=attempts)
            except RetryableError as e:
                if not cfg.enabled:
                    return Result(Outcome.EXHAUSTED, error=e, attempts=attempts)
                delay = backoff.next()
                if e.retry_after is not None:
                    delay = max(delay, e.retry_after)
                if cfg.max_elapsed_time > 0 and self._clock() + delay - start > cfg.max_elapsed_time:
                    return Result(Outcome.EXHAUSTED, error=e, attempts=attempts)
                if on_retry is not None:
                    on_retry(e, delay)
                if not self._wait(delay):
                    return Result(Outcome.ABORTED, error=e, attempts=attempts)
                continue
            return Result(Outcome.EXPORTED, value=value, attempts=attempts)
