"""Sliding-window and packed-document attention on a CUDA GPU: graphopt's Triton kernels, the
flash_attention op (cuDNN when every row holds one document) and specialize_attention_masks on a
transformers model.

References: float64 attention with the mask written out, on the GPU.
"""

import pytest
import torch

from attention_helpers import masked_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(autouse=True)
def first_config_only(monkeypatch):
    """One untimed config per kernel: these tests compile several specialisations; the bench
    tunes."""
    from graphopt.kernels import flash_attention_fwd
    monkeypatch.setattr(flash_attention_fwd, "AUTOTUNE", False)


def packed_positions(lengths, device="cuda"):
    return torch.cat([torch.arange(n) for n in lengths]).to(device)[None]


def qkv(batch, hq, hkv, seq, dim, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(batch, h, seq, dim, device="cuda", dtype=dtype, generator=gen)
            for h in (hq, hkv, hkv)]


@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize("window, lengths", [
    (0, [700, 37, 1, 290]),          # documents, one of a single token
    (300, None),                     # a window shorter than a key block run
    (129, [512, 512]),               # both
])
def test_masked_kernels_match_float64(dtype, window, lengths):
    from graphopt.ops.attention import flash_attention
    q, k, v = qkv(2, 8, 2, 1028 if lengths is None else sum(lengths), 128, dtype)
    positions = None if lengths is None else packed_positions(lengths)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out, lse = flash_attention(q, k, v, causal=True, window=window, positions=positions,
                               kernel="triton")
    dout = torch.randn_like(out)
    out.backward(dout)
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    out_ref, lse_ref = masked_reference(qd, kd, vd, q.shape[-1] ** -0.5, True, window, positions)
    out_ref.backward(dout.double())
    torch.testing.assert_close(out.double(), out_ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse.double(), lse_ref, atol=1e-2, rtol=1e-2)
    for x, ref in zip((q, k, v), (qd, kd, vd)):
        torch.testing.assert_close(x.grad.double(), ref.grad, atol=5e-2, rtol=5e-2)


def test_one_document_per_row_runs_cudnn_and_several_run_triton(monkeypatch):
    """The op checks the position ids on every call: a single run per row is plain causal."""
    import graphopt.ops.attention as attention
    if not attention._cudnn_supports(*qkv(1, 8, 8, 64, 128, torch.bfloat16)[:2]):
        pytest.skip("torch's cuDNN attention is not used on this GPU")
    calls = []
    original = attention._cudnn_block_forward

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(attention, "_cudnn_block_forward", counted)
    q, k, v = qkv(1, 8, 2, 2048, 128, torch.bfloat16)
    single = torch.arange(2048, device="cuda")[None] + 5
    out, _ = attention.flash_attention(q, k, v, causal=True, positions=single)
    assert calls == [1]
    torch.testing.assert_close(out.double(), masked_reference(q, k, v, 128 ** -0.5, True, 0, single)[0],
                               atol=2e-2, rtol=2e-2)
    attention.flash_attention(q, k, v, causal=True, positions=packed_positions([1000, 1048]))
    assert calls == [1]


def test_transformers_mistral_gets_the_masked_kernel_on_cuda():
    """A sliding-window Mistral and packed documents, bf16 on the GPU, compiled with graphopt's
    defaults (Inductor): logits agree with eager within bf16 rounding."""
    transformers = pytest.importorskip("transformers")
    from graphopt.debug.dump import compile_summaries

    import graphopt
    config = transformers.MistralConfig(vocab_size=128, hidden_size=256, intermediate_size=512,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, sliding_window=200)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(config).cuda().to(torch.bfloat16)
    tokens = torch.randint(0, 128, (1, 1024), device="cuda")
    positions = packed_positions([300, 500, 224])
    with torch.no_grad():
        expected = model(tokens, position_ids=positions, use_cache=False).logits.float()
        logits = torch.compile(model, backend="graphopt")(tokens, position_ids=positions,
                                                          use_cache=False).logits.float()
    assert (logits - expected).abs().max().item() < 0.1 * expected.abs().max().item()
    became = [p["stats"]["became"] for s in compile_summaries() for p in s["passes"]
              if p["pass"] == "specialize_attention_masks"]
    assert became == [{"graphopt.flash_attention (causal + documents + window 200)": 2}]
