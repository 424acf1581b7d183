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

    assert inside() == 40 * 2**30  # parsed when set: bytes as an int
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
    with pytest.raises(config.ConfigError, match=r"patch\(offload_activations='yes'\) is not a bool"):
        config.patch(offload_activations="yes")
    with pytest.raises(config.ConfigError, match=r"codegen='cuda'\) is not one of them.*'inductor', 'eager'"):
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
    assert snap.overlap_matmul_collectives is True  # GRAPHOPT_OVERLAP_MATMUL_ALLREDUCE: the old name


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


# --- every value is parsed and checked where it is set ----------------------------------------------

def test_values_are_typed_when_set():
    snap = config.snapshot(memory_budget="1.5GiB", offload_host_capacity="64GiB", overlap_chunks=3,
                           offload_link_slack=0, op_timing_agreement_timeout_s=5,
                           disabled_passes="offload_activations, overlap_matmul_allreduce")
    assert snap.memory_budget == int(1.5 * 2**30) and snap.offload_host_capacity == 64 * 2**30
    assert isinstance(snap.offload_link_slack, float) and isinstance(snap.op_timing_agreement_timeout_s, float)
    assert snap.disabled_passes == ("offload_activations", "overlap_matmul_collectives")
    # one number, one meaning, however it is written: (0, 1] is a fraction, more is whole bytes
    for fraction in (1, 1.0, "1", "1.0"):
        assert config.snapshot(memory_budget=fraction).memory_budget == 1.0
    for nbytes in (4e10, "4e10", 40_000_000_000, "40GB"):
        assert config.snapshot(memory_budget=nbytes).memory_budget == 40_000_000_000
    assert isinstance(config.snapshot(memory_budget="0.5").memory_budget, float)


BAD_VALUES = [
    ("memory_budget", 1.5, "more than 1, so not a fraction, and not a whole number of bytes"),
    ("memory_budget", "1.5", "more than 1, so not a fraction"),
    ("memory_budget", float("inf"), "not a finite number"),
    ("memory_budget", "lots", "not a number with an optional unit"),
    ("memory_budget", "40GB!", "not a number with an optional unit"),
    ("memory_budget", "40 parsecs", "has the unit 'parsecs'"),
    ("memory_budget", 0, "not positive"),
    ("memory_budget", True, "a bool, not a size"),
    ("offload_link_slack", float("nan"), "not a finite number"),
    ("offload_link_slack", -0.1, "is negative"),
    ("offload_host_capacity", -1, "not positive"),
    ("offload_host_capacity", "lots", "not a number with an optional unit"),
    ("overlap_chunks", -2, "is negative"),
    ("overlap_chunks", True, "a bool, not an int"),
    ("op_timing_agreement_timeout_s", float("inf"), "not a finite number"),
    ("disabled_passes", ("ofload_activations",), "(did you mean 'offload_activations'?)"),
    ("disabled_passes", "plan_rematerialisation", "(did you mean 'plan_rematerialization'?)"),
    ("sp_group", 3, "an int, not a process group"),
    ("codegen", "inductr", "(did you mean 'inductor'?)"),
]


@pytest.mark.parametrize("name, value, problem", BAD_VALUES, ids=[f"{n}={v!r}" for n, v, _ in BAD_VALUES])
def test_a_bad_value_fails_where_it_is_set_with_name_value_accepted_and_example(name, value, problem,
                                                                               monkeypatch):
    flag = config.flags()[name]
    shown = repr(value)
    for where, set_it in [("graphopt.config.patch", lambda: config.patch(**{name: value})),
                          ("graphopt.backend", lambda: graphopt.backend(**{name: value})),
                          ("graphopt.config.", lambda: setattr(config, name, value))]:
        with pytest.raises(config.ConfigError) as error:
            set_it()
        message = str(error.value)
        assert where in message and f"{name}={shown}" in message, message
        assert problem in message, message
        assert f"{name} takes {flag.accepts}" in message and f"for example {flag.example}" in message
    assert getattr(config, name) == flag.default  # nothing was set


@pytest.mark.parametrize("variable, text, problem", [
    ("GRAPHOPT_MEMORY_BUDGET", "lots", "not a number with an optional unit"),
    ("GRAPHOPT_MEMORY_BUDGET", "1.5", "more than 1, so not a fraction"),
    ("GRAPHOPT_OFFLOAD_LINK_SLACK", "nan", "not a finite number"),
    ("GRAPHOPT_OFFLOAD_HOST_CAPACITY", "-1", "not positive"),
    ("GRAPHOPT_OVERLAP_CHUNKS", "two", "a str, not an int"),
    ("GRAPHOPT_DISABLED_PASSES", "offload_activation", "did you mean 'offload_activations'?"),
])
def test_a_bad_environment_value_fails_naming_the_variable(variable, text, problem, monkeypatch):
    monkeypatch.setenv(variable, text)
    name = variable[len("GRAPHOPT_"):].lower()
    for read in (config.snapshot, lambda: graphopt.backend(codegen="eager"),
                 lambda: getattr(config, name)):
        with pytest.raises(config.ConfigError) as error:
            read()
        assert f"environment variable {variable}={text!r}" in str(error.value)
        assert problem in str(error.value) and "for example" in str(error.value)


def test_an_unknown_environment_variable_names_the_closest_flag(monkeypatch):
    monkeypatch.setenv("GRAPHOPT_MEMORY_BUDGT", "40GiB")
    for check in (config.snapshot, lambda: graphopt.backend(), config.compile_snapshot):
        with pytest.raises(config.ConfigError, match="GRAPHOPT_MEMORY_BUDGT names no graphopt flag; "
                                                     "did you mean GRAPHOPT_MEMORY_BUDGET?"):
            check()
    monkeypatch.delenv("GRAPHOPT_MEMORY_BUDGT")
    monkeypatch.setenv("GRAPHOPT_SP_GROUP", "tp")
    with pytest.raises(config.ConfigError, match="sp_group cannot be set from the environment"):
        config.snapshot()


def test_paths_are_checked_where_they_are_set(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(config.ConfigError, match="dump_dir=.* exists and is not a folder"):
        config.patch(dump_dir=str(a_file))
    with pytest.raises(config.ConfigError, match="cannot be created: .*a_file is a file"):
        config.patch(dump_dir=str(a_file / "below"))
    assert config.snapshot(dump_dir=tmp_path / "new" / "dump").dump_dir == str(tmp_path / "new" / "dump")

    with pytest.raises(config.ConfigError, match=r"device_profile=.*cannot be read \(No such file"):
        config.patch(device_profile=str(tmp_path / "missing.json"))
    with pytest.raises(config.ConfigError, match="is not JSON .* at line 1, column 1"):
        config.patch(device_profile=str(a_file))
    partial = tmp_path / "partial.json"
    partial.write_text('{"name": "H100", "matmul_tflops": 780, "hbm_gbps": "fast", "warp_drive": 1}')
    with pytest.raises(config.ConfigError) as error:
        config.patch(device_profile=str(partial))
    message = str(error.value)
    assert "unknown keys ['warp_drive']" in message and "'p2p_gbps'" in message
    assert "keys ['hbm_gbps'] are not finite numbers" in message
    assert "python -m graphopt calibrate" in message


def test_flag_aliases_and_pass_names():
    from graphopt.passes.pipeline import PIPELINE
    assert config.PASS_NAMES == tuple(dict.fromkeys(p.name for stage in PIPELINE.values() for p in stage))
    with config.patch(overlap_matmul_allreduce=True):
        assert config.overlap_matmul_collectives is True and config.overlap_matmul_allreduce is True
        assert config.snapshot().overlap_matmul_allreduce is True
    with pytest.raises(config.ConfigError, match="set one of them"):
        config.patch(overlap_matmul_allreduce=True, overlap_matmul_collectives=False)
    assert "overlap_matmul_allreduce" in config.flags()["overlap_matmul_collectives"].doc
    assert "overlap_matmul_collectives" not in config.snapshot().describe().get("overlap_matmul_allreduce", "")


# --- precedence: environment > graphopt.backend(...) > patch / assignment > default -------------------

def test_precedence_environment_over_backend_over_patch_over_default(monkeypatch):
    assert config.snapshot().overlap_chunks == 0                                     # default
    config.overlap_chunks = 1
    try:
        assert config.snapshot().overlap_chunks == 1                                 # assignment
        with config.patch(overlap_chunks=2):
            assert config.snapshot().overlap_chunks == 2                             # patch
            assert config.snapshot(overlap_chunks=3).overlap_chunks == 3             # backend(...)
            monkeypatch.setenv("GRAPHOPT_OVERLAP_CHUNKS", "4")
            assert config.snapshot(overlap_chunks=3).overlap_chunks == 4             # environment
            assert config.overlap_chunks == 4
    finally:
        config.overlap_chunks = 0
    assert "environment > graphopt.backend(...) > patch / assignment > default" in config.__doc__


def test_environment_switches_off_a_pass_given_through_backend(monkeypatch):
    """GRAPHOPT_OFFLOAD_ACTIVATIONS=0 overrides backend(offload_activations=True), as the README says."""
    import torch
    from graphopt.debug.dump import compile_summaries
    monkeypatch.setenv("GRAPHOPT_OFFLOAD_ACTIVATIONS", "0")
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    compiled = torch.compile(model, backend=graphopt.backend(codegen="eager", offload_activations=True))
    compiled(torch.randn(32, 16, requires_grad=True)).sum().backward()
    summary = compile_summaries()[-1]
    assert summary["config"]["offload_activations"] is False
    assert not [p for p in summary["passes"] if p["pass"] == "offload_activations"]


# --- a patch that ends before the graph compiles --------------------------------------------------

def _tiny_model():
    import torch
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))


@pytest.fixture
def no_earlier_patches():
    """Earlier tests patch flags without compiling; a compile here takes their warning first."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", config.FlagsNotAppliedWarning)
        config.compile_snapshot()


def test_a_patch_that_ended_before_the_compile_warns_once(no_earlier_patches):
    """The README's `with patch(...): model = torch.compile(...)` compiles at the first call,
    after the patch ended: the flags did not apply, and graphopt says so once."""
    import torch
    torch._dynamo.reset()
    with config.patch(memory_budget=0.5, overlap_chunks=2):
        compiled = torch.compile(_tiny_model(), backend=graphopt.backend(codegen="eager"))
    with pytest.warns(config.FlagsNotAppliedWarning) as record:
        compiled(torch.randn(4, 8, requires_grad=True)).sum().backward()
    (warning,) = [w for w in record if issubclass(w.category, config.FlagsNotAppliedWarning)]
    text = str(warning.message)
    assert "memory_budget=0.5, overlap_chunks=2 were patched when torch.compile was called but not " \
           "when the graph compiled" in text
    assert "graphopt.backend(memory_budget=0.5, overlap_chunks=2)" in text
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", config.FlagsNotAppliedWarning)
        torch._dynamo.reset()
        again = torch.compile(_tiny_model(), backend=graphopt.backend(codegen="eager"))
        again(torch.randn(4, 8))  # warned once: the next compile is quiet


def test_a_patch_active_at_the_first_call_binds_and_does_not_warn(no_earlier_patches):
    import warnings
    import torch
    from graphopt.debug.dump import compile_summaries
    torch._dynamo.reset()
    compiled = torch.compile(_tiny_model(), backend="graphopt")
    with warnings.catch_warnings():
        warnings.simplefilter("error", config.FlagsNotAppliedWarning)
        with config.patch(codegen="eager", memory_budget=0.5):
            compiled(torch.randn(4, 8, requires_grad=True)).sum().backward()
        assert compile_summaries()[-1]["config"]["memory_budget"] == 0.5
        torch._dynamo.reset()
        with config.patch(memory_budget=0.5):  # a patch that the backend's own flags cover
            covered = torch.compile(_tiny_model(), backend=graphopt.backend(codegen="eager",
                                                                            memory_budget=0.5))
        covered(torch.randn(4, 8))


def test_a_profile_calibrate_writes_without_a_gpu_is_accepted(tmp_path):
    """calibrate writes null for the rates it cannot measure on a CPU (attention, sustained GEMM);
    such a profile loads, while null in a figure every profile has is still refused."""
    import dataclasses
    import json

    from graphopt.analysis.device_profile import CPU

    figures = dataclasses.asdict(CPU)
    figures.update(attention_tflops=None, sustained_matmul_tflops=None)
    profile = tmp_path / "cpu_profile.json"
    profile.write_text(json.dumps(figures))
    assert config.snapshot(device_profile=str(profile)).device_profile == str(profile)
    figures["hbm_gbps"] = None
    profile.write_text(json.dumps(figures))
    with pytest.raises(config.ConfigError, match=r"keys \['hbm_gbps'\] are not finite numbers"):
        config.patch(device_profile=str(profile))
