"""kvstate.backoff: the one backoff rule, as properties."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvstate.backoff import Backoff

backoffs = st.builds(
    Backoff,
    first=st.floats(min_value=0.001, max_value=1.0),
    cap=st.floats(min_value=1.0, max_value=60.0),
    factor=st.floats(min_value=1.0, max_value=4.0),
    jitter=st.floats(min_value=0.0, max_value=1.0),
)


@given(backoffs, st.integers(min_value=1, max_value=10_000), st.integers())
def test_a_wait_stays_within_its_jittered_ceiling_and_the_cap(backoff: Backoff, tries: int, seed: int) -> None:
    ceiling = backoff.ceiling(tries)
    assert backoff.first <= ceiling <= backoff.cap or ceiling == backoff.cap
    wait = backoff.delay(tries, random.Random(seed))
    assert ceiling * (1 - backoff.jitter) - 1e-9 <= wait <= ceiling + 1e-9


@given(backoffs, st.integers(min_value=1, max_value=200))
def test_ceilings_never_shrink(backoff: Backoff, tries: int) -> None:
    assert backoff.ceiling(tries) <= backoff.ceiling(tries + 1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"first": 0, "cap": 1},
        {"first": 2, "cap": 1},
        {"first": 1, "cap": 2, "factor": 0.5},
        {"first": 1, "cap": 2, "jitter": 2},
    ],
)
def test_an_unusable_backoff_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="backoff"):
        Backoff(**kwargs)
