"""A Llama-style reference model: RMSNorm, RoPE, GQA attention through SDPA, SwiGLU MLP.

The demo, tests and benchmarks compile it. Attention heads are read from the projections' local
width (``view(B, S, -1, head_dim)``), so the same code runs unsharded and under DTensor tensor
parallelism (:func:`parallelize_llama`), where each rank holds ``n_heads / tp`` heads and the
row-parallel projections end in the all-reduce that the overlap pass targets.

Position ids are explicit so that a rank holding a slice of the sequence (sequence-parallel
attention) applies RoPE at the slice's global positions.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclasses.dataclass
class LlamaConfig:
    dim: int = 256
    n_layers: int = 2
    n_heads: int = 8
    n_kv_heads: int = 4
    ffn_dim: int = 512
    vocab_size: int = 512
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads "
                             f"{self.n_kv_heads}; GQA shares each key/value head by a whole group")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def tiny(cls, **overrides) -> "LlamaConfig":
        """Small enough for CPU tests: 2 layers, dim 64, 4 query heads sharing 2 key/value heads."""
        values = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=128,
                      max_seq_len=1024)
        values.update(overrides)
        return cls(**values)

    @classmethod
    def llama2_7b(cls, **overrides) -> "LlamaConfig":
        values = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008,
                      vocab_size=32000, max_seq_len=131072)
        values.update(overrides)
        return cls(**values)

    @classmethod
    def llama3_8b(cls, **overrides) -> "LlamaConfig":
        values = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                      vocab_size=128256, max_seq_len=131072, rope_theta=500000.0)
        values.update(overrides)
        return cls(**values)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_tables(position_ids: torch.Tensor, head_dim: int, theta: float):
    """cos/sin of shape [B, S, head_dim/2] for the given (global) positions."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device,
                                             dtype=torch.float32) / head_dim))
    angles = position_ids.float()[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x [B, S, H, D] by the position's angle."""
    x32 = x.float().unflatten(-1, (-1, 2))
    even, odd = x32[..., 0], x32[..., 1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, -1, self.head_dim)
        k = self.wk(x).view(batch, seq, -1, self.head_dim)
        v = self.wv(x).view(batch, seq, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             enable_gqa=q.shape[1] != k.shape[1])
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, S] -> logits [B, S, vocab]; position_ids [B, S] (global), default 0..S-1."""
        return self.output(self.hidden(tokens, position_ids))

    def hidden(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, S] -> the normed last hidden state [B, S, dim] (the output projection's input)."""
        if position_ids is None:
            position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        cos, sin = rope_tables(position_ids, self.cfg.head_dim, self.cfg.rope_theta)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.norm(h)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, position_ids: torch.Tensor | None = None,
             chunks: int | None = None) -> torch.Tensor:
        """Mean next-token cross entropy. ``chunks=None`` is ``llama_loss(self(tokens), targets)``;
        ``chunks=N`` computes the output projection and the loss N token chunks at a time
        (:func:`chunked_output_loss`), so no [B*S, vocab] tensor exists."""
        if chunks is None:
            return llama_loss(self(tokens, position_ids), targets)
        return chunked_output_loss(self.hidden(tokens, position_ids), self.output.weight, targets, chunks)


def llama_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def chunked_output_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunks: int,
                        ignore_index: int = -100) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight).float(), targets)`` (mean over targets that are not
    ``ignore_index``) without ever holding the [tokens, vocab] logits.

    The forward walks the tokens in ``chunks`` pieces; for each it computes the logits, the fp32
    log-softmax, the loss terms and at once count times the gradient of the loss with respect to
    that piece, softmax - one-hot, which it multiplies into the gradients of ``hidden`` (this
    piece's rows) and ``weight`` (accumulated with addmm in the weight's dtype, one rounding per
    piece). The backward only scales those two tensors by the incoming gradient / count (one
    more rounding in a 16-bit dtype, none when the count is a power of two), so nothing of size
    vocab is saved or recomputed: the peak of the loss is a few [tokens / chunks, vocab] fp32
    tensors instead of several [tokens, vocab] ones. hidden [..., dim], weight [vocab, dim],
    targets [...] (the leading sizes of ``hidden``)."""
    if chunks < 1:
        raise ValueError(f"chunks={chunks} must be a positive number of token chunks")
    flat_hidden, flat_targets = hidden.flatten(0, -2), targets.flatten()
    if flat_hidden.shape[0] != flat_targets.shape[0]:
        raise ValueError(f"hidden has {flat_hidden.shape[0]} tokens but targets {flat_targets.shape[0]}; "
                         "targets must have the leading sizes of hidden")
    chunk = -(-flat_hidden.shape[0] // chunks)
    return _ChunkedOutputLoss.apply(flat_hidden, weight, flat_targets, chunk, ignore_index)


class _ChunkedOutputLoss(torch.autograd.Function):
    # The pieces' gradients are formed without the mean's 1 / count: that count is a reduction over
    # every target, and a chunk whose work waited for it would wait for whatever the compiler fuses
    # with it. Inductor fuses it with the final loss sum, which reads every chunk, so every chunk's
    # gradient ran after the last chunk's softmax and all chunks' [chunk, vocab] buffers were live
    # together (measured on an H100 at 8K tokens in 8 chunks: 1 GiB more peak than one chunk's).
    # The scale is applied once, to the two gradients, in backward.
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, ignore_index: int):
        valid = targets != ignore_index
        loss = hidden.new_zeros((), dtype=torch.float32)
        grad_weight = torch.zeros_like(weight)
        grad_pieces = []
        for start in range(0, hidden.shape[0], chunk):
            piece, piece_targets = hidden[start:start + chunk], targets[start:start + chunk]
            piece_valid = valid[start:start + chunk]
            log_probs = torch.log_softmax(F.linear(piece, weight).float(), dim=-1)
            safe_targets = torch.where(piece_valid, piece_targets, 0).unsqueeze(1)
            picked = log_probs.gather(1, safe_targets).squeeze(1)
            loss = loss - torch.where(piece_valid, picked, 0.0).sum()
            # count * d loss / d logits = softmax - one_hot(target) on counted rows, 0 elsewhere
            grad_logits = log_probs.exp().scatter_add(1, safe_targets, -torch.ones_like(log_probs[:, :1]))
            grad_logits = (grad_logits * piece_valid.unsqueeze(1)).to(hidden.dtype)
            grad_pieces.append(grad_logits @ weight)
            grad_weight = torch.addmm(grad_weight, grad_logits.t(), piece)
        scale = 1.0 / valid.sum()  # mean over the counted targets, as cross_entropy's mean
        ctx.save_for_backward(torch.cat(grad_pieces), grad_weight, scale)
        return loss * scale

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, scale = ctx.saved_tensors
        factor = grad_loss * scale
        return grad_hidden * factor, grad_weight * factor, None, None, None


# Megatron-style tensor parallelism of a TransformerBlock as data (linear -> how it splits): what
# parallelize_llama applies without sequence parallelism, and what the layout planner traces.
TENSOR_PARALLEL_LINEARS = {
    "attention.wq": "colwise", "attention.wk": "colwise", "attention.wv": "colwise",
    "attention.wo": "rowwise",
    "feed_forward.w1": "colwise", "feed_forward.w3": "colwise", "feed_forward.w2": "rowwise",
}


def parallelize_llama(model: Llama, tp_mesh, sequence_parallel: bool = False) -> Llama:
    """Megatron-style tensor parallelism through DTensor: column-parallel q/k/v and w1/w3,
    row-parallel wo and w2 (whose outputs are all-reduced, or reduce-scattered with
    ``sequence_parallel=True``, where norms run on sequence shards).

    With ``sequence_parallel=True`` the residual stream between the blocks is each rank's slice of
    the sequence (dim 1, as plain local tensors): the replicated embedding output is sliced on entry
    to the first block, each block all-gathers its normed input before the column-parallel
    projections and reduce-scatters the row-parallel outputs, and the final norm's output is
    all-gathered before the (replicated) output projection, so the logits are full on every rank.
    The sequence length must be divisible by the degree."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput,
                                                   RowwiseParallel, SequenceParallel,
                                                   parallelize_module)

    tp = tp_mesh.size()
    cfg = model.cfg
    if cfg.n_kv_heads % tp or cfg.n_heads % tp:
        raise ValueError(f"tensor-parallel degree {tp} must divide n_heads {cfg.n_heads} and "
                         f"n_kv_heads {cfg.n_kv_heads}; choose a degree that divides both")
    if cfg.ffn_dim % tp:
        raise ValueError(f"tensor-parallel degree {tp} must divide ffn_dim {cfg.ffn_dim}")
    for block in model.layers:
        if sequence_parallel:
            plan = {
                "attention_norm": SequenceParallel(),
                # cos/sin stay plain tensors: the projections' outputs are local tensors.
                "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                                desired_input_layouts=(Replicate(), None, None)),
                "attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(),
                "attention.wv": ColwiseParallel(),
                "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
                "ffn_norm": SequenceParallel(),
                "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),),
                                                   desired_input_layouts=(Replicate(),)),
                "feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
                "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            }
        else:
            plan = {
                "attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(),
                "attention.wv": ColwiseParallel(), "attention.wo": RowwiseParallel(),
                "feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
                "feed_forward.w2": RowwiseParallel(),
            }
        parallelize_module(block, tp_mesh, plan)
    if sequence_parallel:
        # SequenceParallel reads a plain input as the local shard, so the blocks must receive their
        # slice, not the full embedding output (which would read as a P times longer sequence).
        parallelize_module(model, tp_mesh, {
            "layers.0": PrepareModuleInput(input_layouts=(Replicate(), None, None),
                                           desired_input_layouts=(Shard(1), None, None),
                                           use_local_output=True),
            "norm": SequenceParallel(),
            "output": PrepareModuleInput(input_layouts=(Shard(1),),
                                         desired_input_layouts=(Replicate(),),
                                         use_local_output=True),
        })
    return model
