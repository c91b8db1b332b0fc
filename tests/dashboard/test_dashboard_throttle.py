"""The per-client tables of dashboard.throttle: pure, on a fake clock, with hypothesis."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dashboard.throttle import ConnectionCounter, LoginThrottle, RateLimiter, client_key, retry_after_header


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_allows_a_minutes_worth_then_refills_at_the_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(60, clock=clock)
    assert all(limiter.take("a") == 0.0 for _ in range(60))
    wait = limiter.take("a")
    assert 0.99 <= wait <= 1.0  # one a second
    assert limiter.take("b") == 0.0  # another client has its own bucket
    clock.now += 1.0
    assert limiter.take("a") == 0.0 and limiter.take("a") > 0


@given(st.lists(st.tuples(st.integers(0, 30), st.floats(0, 5)), max_size=200), st.integers(1, 50))
def test_rate_limiter_never_allows_more_than_capacity_plus_refill(steps: list[tuple[int, float]], rate: int) -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate, clock=clock)
    start, allowed = clock.now, 0
    for key_number, advance in steps:
        clock.now += advance
        wait = limiter.take(f"k{key_number % 2}")
        assert wait >= 0
        allowed += wait == 0.0
    elapsed = clock.now - start
    assert allowed <= 2 * (rate + elapsed * rate / 60) + 1  # two keys, each at most its bucket plus refill


@given(st.lists(st.text(min_size=1, max_size=8), max_size=300))
def test_tables_stay_bounded(keys: list[str]) -> None:
    clock = FakeClock()
    limiter = RateLimiter(10, max_clients=16, clock=clock)
    throttle = LoginThrottle(3, 60, max_clients=16, clock=clock)
    for key in keys:
        limiter.take(key)
        throttle.failed(key)
    assert len(limiter) <= 16 and len(throttle) <= 16


def test_login_throttle_locks_out_after_the_failures_until_the_window_ends() -> None:
    clock = FakeClock()
    throttle = LoginThrottle(3, 60, clock=clock)
    assert throttle.failed("a") == 0 and throttle.failed("a") == 0
    clock.now += 10
    assert throttle.failed("a") == 50  # the third within the window: locked until 60 s after the first
    assert throttle.retry_after("a") == 50 and throttle.retry_after("b") == 0
    clock.now += 50
    assert throttle.retry_after("a") == 0
    assert throttle.failed("a") == 0  # a new window


def test_login_throttle_forgets_after_a_good_login() -> None:
    clock = FakeClock()
    throttle = LoginThrottle(2, 60, clock=clock)
    throttle.failed("a")
    throttle.succeeded("a")
    assert throttle.failed("a") == 0


@given(st.lists(st.tuples(st.sampled_from("abc"), st.booleans()), max_size=100), st.integers(1, 4))
def test_connection_counter_never_exceeds_its_cap_and_forgets_idle_clients(
    steps: list[tuple[str, bool]], cap: int
) -> None:
    counter = ConnectionCounter(cap)
    held: dict[str, int] = {}
    for key, take in steps:
        if take:
            ok = counter.acquire(key)
            assert ok == (held.get(key, 0) < cap)
            held[key] = held.get(key, 0) + ok
        elif held.get(key, 0):
            counter.release(key)
            held[key] -= 1
        assert counter.open(key) == held.get(key, 0) <= cap
    assert len(counter) == sum(1 for n in held.values() if n)


def test_client_key_folds_ipv6_to_its_64_and_keeps_the_rest() -> None:
    assert client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("2001:db8::1") == client_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert client_key("2001:db8:0:1::1") != client_key("2001:db8::1")
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_key("testclient") == "testclient"
    assert retry_after_header(0.2) == "1" and retry_after_header(7.01) == "8"
