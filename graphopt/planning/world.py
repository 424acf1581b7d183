"""The machines a plan runs on: nodes of GPUs, their memory, the device profile, the links.

Ranks are placed as ``graphopt.planning.parallelize`` builds its mesh, ``[dp, sp, tp]`` in
row-major order: tensor-parallel groups are runs of consecutive ranks (inside one node whenever
``tp`` divides the GPUs of a node), sequence-parallel groups stride over them, and the
data-parallel (FSDP) group strides over both. So TP is placed inside nodes first, then SP, and a
group spans nodes only when its ranks cannot fit in one.

A group inside a node communicates over NVLink at the profile's figures (``allreduce_bus_gbps``,
``p2p_gbps``); a group that spans nodes at ``inter_node_gbps`` per GPU (each GPU's own NIC) and
never gets the intra-node-only runtimes (symmetric-memory copy engine, tile kernels).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from graphopt.analysis.device_profile import H100, H200, DeviceProfile, load_profile

GIB = 2**30

# Dense BF16 peak of the SXM parts from NVIDIA's data sheets (without sparsity): the denominator of
# MFU. Any other device uses its profile's measured GEMM rate.
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4}
NAMED_PROFILES = {"h100": H100, "h200": H200}


class WorldError(ValueError):
    """A world description that cannot be planned for; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class Link:
    """How one group's ranks talk: over NVLink inside a node, or over the network."""

    spans_nodes: bool
    collective_gbps: float   # all-reduce bus bandwidth (reduce-scatter / all-gather: see overlap_cost)
    p2p_gbps: float          # one-direction point-to-point bandwidth

    @property
    def level(self) -> str:
        return "network" if self.spans_nodes else "nvlink"


@dataclasses.dataclass(frozen=True)
class World:
    gpus_per_node: int = 8
    nodes: int = 1
    memory_per_gpu: int = 80 * 10**9    # bytes the GPU has (the planner keeps ``memory_headroom`` free)
    profile: DeviceProfile = H100
    inter_node_gbps: float = 50.0       # GB/s per GPU between nodes (400 Gb/s per GPU)
    peak_tflops: Optional[float] = None  # MFU denominator; None: the data-sheet figure of the device
    memory_headroom: float = 0.1        # fraction of memory left for the allocator's fragmentation,
                                        # NCCL buffers and the CUDA context

    def __post_init__(self) -> None:
        for name in ("gpus_per_node", "nodes"):
            if getattr(self, name) < 1:
                raise WorldError(f"{name}={getattr(self, name)} must be at least 1")
        if self.memory_per_gpu <= 0:
            raise WorldError(f"memory_per_gpu={self.memory_per_gpu} must be a positive number of bytes")
        if not 0 <= self.memory_headroom < 1:
            raise WorldError(f"memory_headroom={self.memory_headroom} must be a fraction in [0, 1)")
        if self.inter_node_gbps <= 0:
            raise WorldError(f"inter_node_gbps={self.inter_node_gbps} must be positive (GB/s per GPU)")

    @property
    def size(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def usable_memory(self) -> int:
        return int(self.memory_per_gpu * (1 - self.memory_headroom))

    def peak_flops(self) -> float:
        """FLOP/s per GPU that MFU divides by."""
        if self.peak_tflops is not None:
            return self.peak_tflops * 1e12
        for name, tflops in PEAK_BF16_TFLOPS.items():
            if name in self.profile.name.upper():
                return tflops * 1e12
        return self.profile.matmul_tflops * 1e12

    def spans_nodes(self, size: int, stride: int) -> bool:
        """Whether a group of ``size`` ranks ``stride`` apart (placed as described above) spans nodes."""
        return size > 1 and size * stride > self.gpus_per_node

    def placement_refusal(self, size: int, stride: int) -> Optional[str]:
        """None when a group of ``size`` ranks ``stride`` apart is placed cleanly: all inside one
        node, or the same number of ranks on each node it spans."""
        span = size * stride
        if size == 1 or span <= self.gpus_per_node and self.gpus_per_node % span == 0:
            return None
        if span % self.gpus_per_node == 0 and (self.gpus_per_node % stride == 0
                                                or stride % self.gpus_per_node == 0):
            return None
        return (f"a group of {size} ranks {stride} apart does not split evenly over nodes of "
                f"{self.gpus_per_node} GPUs")

    def link(self, size: int, stride: int) -> Link:
        if self.spans_nodes(size, stride):
            return Link(True, self.inter_node_gbps, self.inter_node_gbps)
        return Link(False, self.profile.allreduce_bus_gbps, self.profile.p2p_gbps)

    def describe(self) -> dict[str, Any]:
        return {"nodes": self.nodes, "gpus_per_node": self.gpus_per_node,
                "memory_per_gpu_gib": round(self.memory_per_gpu / GIB, 2),
                "usable_memory_gib": round(self.usable_memory / GIB, 2),
                "inter_node_gbps": self.inter_node_gbps, "peak_tflops": self.peak_flops() / 1e12,
                "profile": self.profile.to_json()}


def resolve_profile(value: Any) -> DeviceProfile:
    """A device profile from a DeviceProfile, a named default ('h100', 'h200') or a JSON path
    written by ``python -m graphopt calibrate``."""
    if isinstance(value, DeviceProfile):
        return value
    if isinstance(value, str) and value.lower() in NAMED_PROFILES:
        return NAMED_PROFILES[value.lower()]
    if isinstance(value, str):
        try:
            return load_profile(value)
        except FileNotFoundError:
            raise WorldError(f"device profile {value!r} is neither a file nor one of "
                             f"{sorted(NAMED_PROFILES)}; write one with `python -m graphopt "
                             "calibrate --out profile.json`") from None
    raise WorldError(f"profile={value!r}: give a DeviceProfile, a name ({sorted(NAMED_PROFILES)}) "
                     "or the path of a calibrated profile")
