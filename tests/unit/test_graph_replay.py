"""graphopt.distributed.graph_replay's policy, with a fake capture (the CUDA side runs in
tests/gpu/test_matmul_allreduce_gpu.py)."""

import logging

import pytest

from graphopt.distributed.graph_replay import GraphReplay


class FakeGraph:
    """What a capture records: the ops ``issue`` would have run, replayed on demand."""

    def __init__(self, ops: list):
        self.ops = ops
        self.replays = 0

    def replay(self):
        self.replays += 1


class Recorder:
    def __init__(self, fail: bool = False):
        self.issued = []          # ops run eagerly
        self.captures = []
        self.fail = fail
        self.outer_capture = False

    def capture(self, issue):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        before = len(self.issued)
        issue()                   # a capture records the ops without running them
        graph = FakeGraph(self.issued[before:])
        del self.issued[before:]
        self.captures.append(graph)
        return graph

    def cache(self, capacity: int = 8) -> GraphReplay:
        return GraphReplay(capacity, capture=self.capture, capturing=lambda: self.outer_capture)


def call(cache: GraphReplay, recorder: Recorder, key) -> str:
    return cache.run(key, lambda: recorder.issued.append(key))


def test_first_call_eager_second_captured_then_replayed():
    recorder = Recorder()
    cache = recorder.cache()
    assert [call(cache, recorder, "k") for _ in range(4)] == ["eager", "captured", "replayed",
                                                              "replayed"]
    assert recorder.issued == ["k"]                       # issued op by op once
    assert recorder.captures[0].ops == ["k"]              # the capture recorded the call's ops
    assert recorder.captures[0].replays == 3              # captured call + two replays
    assert (cache.stats.eager, cache.stats.captured, cache.stats.replayed) == (1, 1, 2)


def test_keys_are_separate():
    recorder = Recorder()
    cache = recorder.cache()
    assert [call(cache, recorder, key) for key in "abab"] == ["eager", "eager", "captured",
                                                              "captured"]
    assert call(cache, recorder, "a") == call(cache, recorder, "b") == "replayed"
    assert [g.ops for g in recorder.captures] == [["a"], ["b"]]


def test_least_recently_used_graph_is_evicted():
    recorder = Recorder()
    cache = recorder.cache(capacity=2)
    for key in "aabbcc":
        call(cache, recorder, key)
    assert list(cache.graphs) == ["b", "c"] and cache.stats.evicted == 1
    assert call(cache, recorder, "b") == "replayed"
    assert call(cache, recorder, "a") == "captured"       # seen before: captured again, not eager


def test_inside_an_outer_capture_the_call_is_issued_into_it():
    recorder = Recorder()
    cache = recorder.cache()
    call(cache, recorder, "k")
    call(cache, recorder, "k")
    recorder.outer_capture = True
    assert call(cache, recorder, "k") == "eager"          # not a replay inside someone's capture
    assert recorder.issued == ["k", "k"]


def test_a_failed_capture_falls_back_to_eager_for_good(caplog):
    recorder = Recorder(fail=True)
    cache = recorder.cache()
    with caplog.at_level(logging.WARNING, logger="graphopt.distributed.graph_replay"):
        assert [call(cache, recorder, "k") for _ in range(3)] == ["eager"] * 3
    assert recorder.issued == ["k"] * 3                   # every call still ran, op by op
    assert "capture failed" in cache.disabled
    assert "could not be captured" in caplog.text


def test_capturing_stops_when_addresses_never_repeat(caplog):
    recorder = Recorder()
    cache = recorder.cache(capacity=3)
    with caplog.at_level(logging.INFO, logger="graphopt.distributed.graph_replay"):
        for index in range(6):           # each key comes back once, never a third time
            call(cache, recorder, index)
            call(cache, recorder, index)
    assert cache.disabled and "do not repeat" in cache.disabled and not cache.graphs
    assert cache.stats.captured == 6 and cache.stats.wasted == 3
    assert [call(cache, recorder, 7), call(cache, recorder, 7)] == ["eager", "eager"]
    assert "replay off" in caplog.text


@pytest.mark.parametrize("capacity", [1, 4])
def test_capturing_continues_while_graphs_are_replayed(capacity):
    recorder = Recorder()
    cache = recorder.cache(capacity=capacity)
    for _ in range(3):
        for key in range(2 * capacity):     # more keys than graphs: evictions, but replays too
            for _ in range(3):
                call(cache, recorder, key)
    assert cache.disabled is None and cache.stats.evicted >= capacity
