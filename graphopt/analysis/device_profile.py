"""What the planners assume about the machine: GEMM throughput and link bandwidths.

Defaults are figures measured on the lent H100/H200 machines (../shared/GPU.md); ``python -m
graphopt calibrate`` measures the current machine and writes a JSON profile that
``graphopt.config.device_profile`` (or ``GRAPHOPT_DEVICE_PROFILE``) points at.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    name: str
    matmul_tflops: float        # dense bf16/fp16 GEMM, large shapes
    matmul_tflops_fp32: float   # fp32 GEMM (TF32 off)
    hbm_gbps: float             # device memory bandwidth, bytes read + written
    allreduce_bus_gbps: float   # NCCL all-reduce bus bandwidth between GPUs of one host
    p2p_gbps: float             # one-direction peer-to-peer copy bandwidth
    host_link_gbps: float       # pinned host <-> device copy, each way
    kernel_launch_s: float = 5e-6
    collective_latency_s: float = 15e-6
    # What a training step's kernels run at, for the layout planner (None: matmul_tflops):
    # causal SDPA forward + backward (FLOPs counted as the cost model counts them), and bf16 GEMMs
    # issued back to back for a second or more, when the clock has settled under the power limit.
    attention_tflops: float | None = None
    sustained_matmul_tflops: float | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# attention_tflops: SDPA (cuDNN) causal forward + backward at B=1 H=32 D=128, S=8K-32K (GPU.md);
# sustained_matmul_tflops: bench/results/gemm_power.md (H100 at its power limit, ~1400 MHz).
H200 = DeviceProfile("H200", matmul_tflops=790.0, matmul_tflops_fp32=50.0, hbm_gbps=4300.0,
                     allreduce_bus_gbps=285.0, p2p_gbps=350.0, host_link_gbps=55.0,
                     attention_tflops=540.0)
H100 = DeviceProfile("H100", matmul_tflops=780.0, matmul_tflops_fp32=50.0, hbm_gbps=3000.0,
                     allreduce_bus_gbps=329.0, p2p_gbps=350.0, host_link_gbps=55.0,
                     attention_tflops=520.0, sustained_matmul_tflops=700.0)
# CPU: only so that plans made in CPU tests have sane relative costs.
CPU = DeviceProfile("cpu", matmul_tflops=0.2, matmul_tflops_fp32=0.1, hbm_gbps=20.0,
                    allreduce_bus_gbps=5.0, p2p_gbps=5.0, host_link_gbps=20.0,
                    kernel_launch_s=2e-6, collective_latency_s=50e-6)


def load_profile(path: str) -> DeviceProfile:
    """The profile in the JSON file ``path``; OSError / json.JSONDecodeError where it cannot be
    read, ValueError naming the fields where it is not a device profile."""
    with open(path) as handle:
        data = json.load(handle)
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object of figures; "
                         "regenerate it with `python -m graphopt calibrate`")
    fields = {f.name: f for f in dataclasses.fields(DeviceProfile)}
    unknown = sorted(set(data) - set(fields))
    missing = sorted(name for name, f in fields.items()
                     if f.default is dataclasses.MISSING and name not in data)
    # A field whose default is None may be null: calibrate writes null where it measured nothing
    # (the attention and sustained GEMM rates on a machine without a GPU).
    optional = {name for name, f in fields.items() if f.default is None}
    not_figures = sorted(name for name, value in data.items() if name != "name" and name in fields
                         and not (value is None and name in optional)
                         and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not value >= 0 or value == float("inf")))
    problems = ([f"unknown keys {unknown}"] if unknown else []) + \
        ([f"missing keys {missing}"] if missing else []) + \
        ([f"keys {not_figures} are not finite numbers >= 0"] if not_figures else [])
    if problems:
        raise ValueError(f"device profile {path} has {'; '.join(problems)}; regenerate it with "
                         "`python -m graphopt calibrate`")
    return DeviceProfile(**data)


def current_profile(path: str | None = None) -> DeviceProfile:
    """The profile in the file ``path`` (``config.device_profile``), else a default for the visible
    device."""
    if path:
        return load_profile(path)
    import torch
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return H200 if "H200" in name else H100
    return CPU
