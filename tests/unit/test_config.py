import pytest

import graphopt
from graphopt import config


def test_defaults_and_assignment_roundtrip():
    assert config.codegen == "inductor"
    with config.patch(codegen="eager"):
        assert config.codegen == "eager"
    assert config.codegen == "inductor"


def test_patch_is_a_decorator_and_restores_on_error():
    @config.patch(memory_budget="40GiB")
    def inside():
        return config.memory_budget

    assert inside() == "40GiB"
    assert config.memory_budget is None
    with pytest.raises(RuntimeError):
        with config.patch(overlap_matmul_allreduce=True):
            raise RuntimeError("boom")
    assert config.overlap_matmul_allreduce is False


def test_unknown_flag_raises_and_lists_valid_flags():
    with pytest.raises(config.UnknownFlagError) as err:
        config.patch(sequence_paralel_attention=True)
    assert "sequence_parallel_attention" in str(err.value)
    with pytest.raises(AttributeError):
        config.no_such_flag
    with pytest.raises(config.UnknownFlagError):
        graphopt.backend(no_such_flag=1)


def test_wrong_type_and_choice_are_rejected_with_the_fix():
    with pytest.raises(config.ConfigError, match="must be bool"):
        config.patch(offload_activations="yes")
    with pytest.raises(config.ConfigError, match="not one of"):
        config.patch(codegen="cuda")


def test_environment_overrides_flags(monkeypatch):
    monkeypatch.setenv("GRAPHOPT_DUMP_DIR", "/tmp/from_env")
    monkeypatch.setenv("GRAPHOPT_OVERLAP_MATMUL_ALLREDUCE", "1")
    monkeypatch.setenv("GRAPHOPT_OVERLAP_CHUNKS", "4")
    monkeypatch.setenv("GRAPHOPT_MEMORY_BUDGET", "0.5")
    monkeypatch.setenv("GRAPHOPT_DISABLED_PASSES", "shard_attention, offload_activations")
    with config.patch(dump_dir="from_code", overlap_matmul_allreduce=False):
        snap = config.snapshot()
    assert snap.dump_dir == "/tmp/from_env"
    assert snap.overlap_matmul_allreduce is True
    assert snap.overlap_chunks == 4
    assert snap.memory_budget == 0.5
    assert snap.disabled_passes == ("shard_attention", "offload_activations")


def test_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("GRAPHOPT_OFFLOAD_ACTIVATIONS", "maybe")
    with pytest.raises(config.ConfigError, match="GRAPHOPT_OFFLOAD_ACTIVATIONS"):
        config.offload_activations


def test_snapshot_is_read_only_and_digest_tracks_values():
    a = config.snapshot()
    b = config.snapshot(overlap_chunks=3)
    with pytest.raises(AttributeError):
        a.codegen = "eager"
    assert a.digest() != b.digest()
    assert a.digest() == config.snapshot().digest()


def test_every_flag_has_a_comment_and_group():
    for flag in config.flags().values():
        assert flag.doc and flag.group
    text = config.describe_flags()
    assert "[rematerialization]" in text and "memory_budget" in text


def test_op_timing_flag_takes_the_environment_and_rejects_other_modes(monkeypatch):
    assert config.op_timing == "auto"
    monkeypatch.setenv("GRAPHOPT_OP_TIMING", "model")
    assert config.op_timing == "model" and config.snapshot().op_timing == "model"
    with pytest.raises(config.ConfigError, match="not one of"):
        config.patch(op_timing="roofline")
