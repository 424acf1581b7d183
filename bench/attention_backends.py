"""Which attention kernels are fastest on this GPU, forward and backward, and which one SDPA picks.

    python3 bench/attention_backends.py --out DIR

Causal, B=1, H=32, D=128, bf16. For each S and Hkv: SDPA forward+backward under each backend
(default choice, flash, cuDNN, memory-efficient), graphopt's Triton forward and backward (their
default variants; ``triton_ran`` names the variants that ran), and the
backward kernels graphopt can call with its own (out, lse): torch's flash (FA2) and cuDNN
backward ops (graphopt runs cuDNN's forward and backward on eligible blocks since this comparison). Each backward kernel is first checked against float32 SDPA gradients (max error /
SDPA-bf16's error). Writes attention_backends.json / .md; times are triton.testing.do_bench medians.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys

import torch
import torch.nn.functional as F
import triton
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from graphopt.kernels import launch_counts  # noqa: E402
from graphopt.ops.attention import (  # noqa: E402
    _cudnn_block_backward, _cudnn_block_forward, _expand_heads, attention_block_backward,
    attention_block_forward)

HEADS, DIM = 32, 128
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def flash2_state(q):
    """(cum_seq_q, cum_seq_k, philox seed, philox offset) of a dropout-free flash forward, in the
    form this torch build returns them; the backward takes them back and, with no dropout, never
    reads them. Taken once, outside the timed calls."""
    tiny = q.new_zeros(1, 1, 16, q.shape[-1])
    result = torch.ops.aten._scaled_dot_product_flash_attention(tiny, tiny, tiny, 0.0, False)
    return result[2], result[3], result[6], result[7]


def flash2_block_backward(q, k, v, out, lse, dout, state, *, scale, is_causal):
    """torch's flash (FA2) backward op on graphopt's (out, lse); K/V repeated for GQA."""
    hq = q.shape[1]
    cum_q, cum_k, seed, offset = state
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout, q, _expand_heads(k, hq).contiguous(), _expand_heads(v, hq).contiguous(), out, lse,
        cum_q, cum_k, q.shape[2], k.shape[2], 0.0, is_causal, seed, offset, scale=scale)


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def case(seq: int, hkv: int, check: bool) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, HEADS, seq, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(1, hkv, seq, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
            for _ in range(2))
    dout = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    scale = 1 / math.sqrt(DIM)
    row = {"seq": seq, "hkv": hkv}
    row["sdpa_default_backend"] = str(torch._fused_sdp_choice(q, k, v, is_causal=True,
                                                              enable_gqa=hkv != HEADS))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]

    def fwd_bwd():
        sdpa(*leaves).backward(dout)

    row["sdpa_default_fwd_bwd_ms"] = triton.testing.do_bench(fwd_bwd)
    row["sdpa_default_fwd_ms"] = triton.testing.do_bench(lambda: sdpa(q, k, v))
    for name, backend in BACKENDS.items():
        try:
            with sdpa_kernel(backend):
                row[f"sdpa_{name}_fwd_ms"] = triton.testing.do_bench(lambda: sdpa(q, k, v))
                row[f"sdpa_{name}_fwd_bwd_ms"] = triton.testing.do_bench(fwd_bwd)
        except RuntimeError as err:
            row[f"sdpa_{name}"] = f"unavailable: {str(err).splitlines()[0][:120]}"
    before = dict(launch_counts)
    out, lse = attention_block_forward(q, k, v, scale=scale, causal=True, impl="triton")
    attention_block_backward(q, k, v, out, lse, dout, scale=scale, causal=True, impl="triton")
    row["triton_ran"] = sorted(name for name, count in launch_counts.items()
                               if count > before.get(name, 0))
    row["ours_fwd_ms"] = triton.testing.do_bench(
        lambda: attention_block_forward(q, k, v, scale=scale, causal=True, impl="triton"))
    row["cudnn_block_fwd_ms"] = triton.testing.do_bench(
        lambda: _cudnn_block_forward(q, k, v, scale=scale, is_causal=True))
    state = flash2_state(q)
    kernels = {
        "triton": lambda: attention_block_backward(q, k, v, out, lse, dout, scale=scale, causal=True,
                                                   impl="triton"),
        "flash2": lambda: flash2_block_backward(q, k, v, out, lse, dout, state, scale=scale,
                                                is_causal=True),
        "cudnn": lambda: _cudnn_block_backward(q, k, v, out, lse, dout, scale=scale,
                                               is_causal=True),
    }
    if check:
        ref = [x.float().requires_grad_() for x in (q, k, v)]
        sdpa(*ref).backward(dout.float())
        base = [x.clone().requires_grad_() for x in (q, k, v)]
        sdpa(*base).backward(dout)
    for name, fn in kernels.items():
        try:
            grads = fn()
            if check:
                group = HEADS // hkv
                errors = []
                for g, r, b in zip(grads, ref, base):
                    if g.shape[1] != r.shape[1]:
                        g = g.unflatten(1, (hkv, group)).float().sum(2)
                    errors.append((g.float() - r.grad).abs().max().item()
                                  / max((b.grad.float() - r.grad).abs().max().item(), 1e-3))
                row[f"bwd_{name}_error_ratio"] = max(errors)
            row[f"bwd_{name}_ms"] = triton.testing.do_bench(fn)
        except Exception as err:  # noqa: BLE001 - record why a kernel cannot run here
            row[f"bwd_{name}"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seq", default="4096,16384,32768")
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "rows": []}
    for hkv in (32, 8):
        for seq in (int(s) for s in args.seq.split(",")):
            row = case(seq, hkv, check=seq <= 4096)
            print(json.dumps(row), flush=True)
            result["rows"].append(row)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "attention_backends.json"), "w") as handle:
        json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
