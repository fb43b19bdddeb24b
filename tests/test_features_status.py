"""Merged ``GET /pipelines/status`` extras (pure): state filter and the opt-in worker field."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.status import STATES, BadStatusQuery, StatusQuery, merge_status_lists, parse_status_query


def body(*states: str, prefix: str = "a") -> bytes:
    return json.dumps([{"id": f"{prefix}{i}", "state": s, "avg_fps": 30.0} for i, s in enumerate(states)]).encode()


class TestParse:
    def test_no_query_changes_nothing(self) -> None:
        assert parse_status_query("") == StatusQuery()

    def test_states_comma_separated_repeated_any_case(self) -> None:
        q = parse_status_query("state=running,Queued&state=ABORTED")
        assert q.states == {"RUNNING", "QUEUED", "ABORTED"} and not q.with_worker

    def test_worker_flag(self) -> None:
        assert parse_status_query("worker=true").with_worker
        assert parse_status_query("worker=1").with_worker
        assert not parse_status_query("worker=false").with_worker

    def test_other_parameters_are_passed_on(self) -> None:
        q = parse_status_query("state=RUNNING&x=1&y=a%20b")
        assert q.forward_query == "x=1&y=a+b"

    @pytest.mark.parametrize(("query", "error"), [
        ("state=RUNING", "unknown state RUNING"),
        ("state=RUNNING,bogus", "unknown state BOGUS"),
        ("state=", "empty state filter"),
        ("state=,", "empty state filter"),
        ("worker=maybe", "worker must be true or false, not 'maybe'"),
    ])
    def test_bad_values_are_400_with_a_clear_body(self, query: str, error: str) -> None:
        with pytest.raises(BadStatusQuery) as caught:
            parse_status_query(query)
        assert caught.value.payload["error"] == error
        assert caught.value.payload["parameter"] in ("state", "worker")
        assert caught.value.payload["allowed"]


class TestMerge:
    def test_default_is_the_original_shape(self) -> None:
        answers = [("w1", body("RUNNING", "ABORTED")), ("w2", None), ("w3", b'{"error": 1}')]
        merged = merge_status_lists(answers)
        assert json.loads(merged.body) == json.loads(body("RUNNING", "ABORTED"))
        assert merged.missing == ["w2", "w3"]

    def test_filter_and_worker_field(self) -> None:
        answers = [("w1", body("RUNNING", "COMPLETED")), ("w2", body("QUEUED", "RUNNING", prefix="b"))]
        merged = json.loads(merge_status_lists(answers, StatusQuery(frozenset({"RUNNING"}), True)).body)
        assert merged == [{"id": "a0", "state": "RUNNING", "avg_fps": 30.0, "worker": "w1"},
                          {"id": "b1", "state": "RUNNING", "avg_fps": 30.0, "worker": "w2"}]


@settings(max_examples=100, deadline=None)
@given(lists=st.lists(st.lists(st.sampled_from(sorted(STATES)), max_size=6), min_size=1, max_size=4),
       wanted=st.sets(st.sampled_from(sorted(STATES)), min_size=1), with_worker=st.booleans())
def test_filter_keeps_exactly_the_wanted_entries_in_order(
    lists: list[list[str]], wanted: set[str], with_worker: bool
) -> None:
    answers = [(f"w{n}", body(*states, prefix=f"w{n}-")) for n, states in enumerate(lists)]
    everything = json.loads(merge_status_lists(answers).body)
    kept = json.loads(merge_status_lists(answers, StatusQuery(frozenset(wanted), with_worker)).body)
    assert [e["id"] for e in kept] == [e["id"] for e in everything if e["state"] in wanted]
    for entry in kept:
        assert ("worker" in entry) == with_worker
        if with_worker:
            assert entry["id"].startswith(entry["worker"] + "-")
