"""What several attention test files share: tiny random transformers models, and float64
attention with a causal / sliding-window / packed-document mask written out."""

from __future__ import annotations

import torch

# transformers 4.53 added packed-sequence detection (documents from position ids that restart);
# before, packed position ids only move the rotary positions and the mask stays causal. From 4.53
# on, sdpa attention also gets a materialised mask under torch.compile (before: is_causal=True).
SLIDING_WINDOW = 5


def transformers_version() -> tuple[int, int]:
    import transformers
    return tuple(int(part) for part in transformers.__version__.split(".")[:2])


def tiny_model(kind: str, attn: str):
    """A random 2-layer LlamaForCausalLM ("llama") or sliding-window MistralForCausalLM
    ("mistral"), grouped-query heads, with ``attn`` ("sdpa" / "eager") attention."""
    import transformers
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  attention_dropout=0.0)
    if kind == "mistral":
        config = transformers.MistralConfig(**common, sliding_window=SLIDING_WINDOW)
        model_type = transformers.MistralForCausalLM
    else:
        config = transformers.LlamaConfig(**common)
        model_type = transformers.LlamaForCausalLM
    config._attn_implementation = attn
    torch.manual_seed(0)
    return model_type(config)


def document_ids(positions: torch.Tensor) -> torch.Tensor:
    """[B, S] document ids: a document starts where a position is not the previous one plus one
    (counted here independently of graphopt's document_bounds)."""
    new = torch.ones_like(positions, dtype=torch.bool)
    new[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    return new.cumsum(1)


def masked_reference(q, k, v, scale, causal=True, window=0, positions=None):
    """float64 (out, lse) over the full sequence with the mask written out."""
    group = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(group, 1) for x in (k, v))
    s = q.double() @ k.transpose(-1, -2) * scale
    i = torch.arange(q.shape[2], device=q.device)
    keep = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool, device=q.device)
    if causal:
        keep = keep & (i[None, :] <= i[:, None])
    if window:
        keep = keep & (i[:, None] - i[None, :] < window)
    keep = keep[None, None]
    if positions is not None:
        ids = document_ids(positions)
        keep = keep & (ids[:, :, None] == ids[:, None, :])[:, None]
    s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)
