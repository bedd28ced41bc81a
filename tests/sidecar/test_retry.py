"""Retry with backoff: the sequence of waits, the backend's delay, the deadline, shutdown. No real sleeps."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sidecar.component import PermanentError, RetryableError
from sidecar.queue.retry import Backoff, Outcome, RetryConfig, RetrySender


class FakeTime:
    """A clock that only moves when the sender waits; records every wait."""

    def __init__(self):
        self.now = 1000.0
        self.waits: list[float] = []
        self.interrupt_after: int | None = None

    def clock(self) -> float:
        return self.now

    def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        if self.interrupt_after is not None and len(self.waits) > self.interrupt_after:
            return False
        self.now += seconds
        return True


def failing(times: int, error: Exception, then: object = 0):
    calls = {"n": 0}

    def attempt():
        calls["n"] += 1
        if calls["n"] <= times:
            raise error
        return then

    attempt.calls = calls
    return attempt


def cfg(**kw) -> RetryConfig:
    base = dict(initial_interval="1s", randomization_factor=0, multiplier=2, max_interval="8s", max_elapsed_time="60s")
    return RetryConfig.model_validate({**base, **kw})


def test_backoff_grows_by_multiplier_and_caps_at_max_interval():
    t = FakeTime()
    sender = RetrySender(cfg(), wait=t.wait, clock=t.clock)
    result = sender.send(failing(6, RetryableError("unavailable")))
    assert result.outcome is Outcome.EXPORTED
    assert result.attempts == 7
    assert t.waits == [1, 2, 4, 8, 8, 8]


def test_jitter_stays_within_randomization_factor():
    c = cfg(randomization_factor=0.5)
    lo = Backoff(c, rand=lambda: 0.0)
    hi = Backoff(c, rand=lambda: 0.999999)
    assert [round(lo.next(), 3) for _ in range(3)] == [0.5, 1.0, 2.0]
    assert [round(hi.next(), 3) for _ in range(3)] == [1.5, 3.0, 6.0]


def test_backend_retry_after_is_honoured_when_longer_than_backoff():
    t = FakeTime()
    sender = RetrySender(cfg(), wait=t.wait, clock=t.clock)
    result = sender.send(failing(2, RetryableError("throttled", retry_after=7.5)))
    assert result.outcome is Outcome.EXPORTED
    assert t.waits == [7.5, 7.5]


def test_gives_up_when_the_next_wait_would_pass_max_elapsed_time():
    t = FakeTime()
    sender = RetrySender(cfg(max_elapsed_time="10s"), wait=t.wait, clock=t.clock)
    attempt = failing(100, RetryableError("down"))
    result = sender.send(attempt)
    assert result.outcome is Outcome.EXHAUSTED
    assert t.waits == [1, 2, 4]  # 7s spent; the next 8s wait would end at 15s > 10s
    assert attempt.calls["n"] == 4
    assert isinstance(result.error, RetryableError)


def test_retry_after_beyond_max_elapsed_time_gives_up_at_once():
    t = FakeTime()
    sender = RetrySender(cfg(max_elapsed_time="10s"), wait=t.wait, clock=t.clock)
    result = sender.send(failing(1, RetryableError("come back in an hour", retry_after=3600)))
    assert result.outcome is Outcome.EXHAUSTED
    assert t.waits == []


def test_zero_max_elapsed_time_retries_forever():
    t = FakeTime()
    sender = RetrySender(cfg(max_elapsed_time=0), wait=t.wait, clock=t.clock)
    assert sender.send(failing(200, RetryableError("down"))).outcome is Outcome.EXPORTED
    assert len(t.waits) == 200


def test_permanent_error_is_not_retried():
    t = FakeTime()
    attempt = failing(5, PermanentError("bad request"))
    result = RetrySender(cfg(), wait=t.wait, clock=t.clock).send(attempt)
    assert result.outcome is Outcome.PERMANENT
    assert attempt.calls["n"] == 1 and t.waits == []


def test_disabled_retry_tries_once():
    t = FakeTime()
    attempt = failing(5, RetryableError("down"))
    result = RetrySender(cfg(enabled=False), wait=t.wait, clock=t.clock).send(attempt)
    assert result.outcome is Outcome.EXHAUSTED
    assert attempt.calls["n"] == 1


def test_interrupted_wait_aborts_and_reports_each_retry():
    t = FakeTime()
    t.interrupt_after = 2
    seen = []
    result = RetrySender(cfg(), wait=t.wait, clock=t.clock).send(
        failing(100, RetryableError("down")), on_retry=lambda e, d: seen.append(d))
    assert result.outcome is Outcome.ABORTED
    assert seen == [1, 2, 4]


def test_result_carries_push_value():
    t = FakeTime()
    assert RetrySender(cfg(), wait=t.wait, clock=t.clock).send(lambda: 3).value == 3


@pytest.mark.parametrize("body, problem", [
    ({"initial_interval": "0s"}, "initial_interval"),
    ({"initial_interval": "10s", "max_interval": "1s"}, "max_interval"),
    ({"multiplier": 0.5}, "multiplier"),
    ({"randomization_factor": 2}, "randomization_factor"),
    ({"max_elapsed": "1s"}, "max_elapsed"),
])
def test_config_rejects_nonsense(body, problem):
    with pytest.raises(ValidationError) as e:
        RetryConfig.model_validate(body)
    assert problem in str(e.value)


def test_defaults_match_otelcol():
    c = RetryConfig()
    assert (c.enabled, c.initial_interval, c.randomization_factor, c.multiplier, c.max_interval,
            c.max_elapsed_time) == (True, 5.0, 0.5, 1.5, 30.0, 300.0)
