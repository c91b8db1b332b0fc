"""RFC 7386 JSON merge patch: the RFC's own examples plus properties."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvstate.merge import merge_patch

# RFC 7386 Appendix A.
RFC_EXAMPLES = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize(("target", "patch", "expected"), RFC_EXAMPLES)
def test_rfc7386_examples(target: object, patch: object, expected: object) -> None:
    assert merge_patch(target, patch) == expected


json_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=5)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(max_size=3), json_values, max_size=4)


@given(json_objects, json_objects)
def test_merge_is_idempotent(target: dict[str, object], patch: dict[str, object]) -> None:
    once = merge_patch(target, patch)
    assert merge_patch(once, patch) == once


@given(json_objects, json_objects)
def test_merge_never_mutates_its_inputs(target: dict[str, object], patch: dict[str, object]) -> None:
    target_before, patch_before = copy.deepcopy(target), copy.deepcopy(patch)
    merge_patch(target, patch)
    assert target == target_before
    assert patch == patch_before


@given(json_objects, json_objects)
def test_patched_members_win_and_nulls_remove(target: dict[str, object], patch: dict[str, object]) -> None:
    result = merge_patch(target, patch)
    assert isinstance(result, dict)
    for name, value in patch.items():
        if value is None:
            assert name not in result
        elif not isinstance(value, dict):
            assert result[name] == value
    for name, value in target.items():
        if name not in patch:
            assert result[name] == value


@given(json_objects, st.text(max_size=3), st.text(max_size=3), json_scalars, json_scalars)
def test_patches_of_distinct_members_commute(target: dict[str, object], a: str, b: str, va: object, vb: object) -> None:
    if a == b:
        return
    pa, pb = {a: va}, {b: vb}
    assert merge_patch(merge_patch(target, pa), pb) == merge_patch(merge_patch(target, pb), pa)
