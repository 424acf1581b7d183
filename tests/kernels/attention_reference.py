"""The float64 attention both kernel test files compare against (independent of graphopt's code)."""

import torch


def plain_attention(q, k, v, scale, causal, q_offset=0, k_offset=0, window=0, documents=None):
    """float64 attention with repeated K/V; rows with no visible key give out 0, lse -inf.

    ``window`` w: a query sees keys less than w positions back; ``documents`` [B, S]: the document
    id of every global position, a query sees keys of its own document only."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, 1)
    v = v.double().repeat_interleave(group, 1)
    s = q.double() @ k.transpose(-1, -2) * scale
    q_pos = torch.arange(q.shape[2]) + q_offset
    k_pos = torch.arange(k.shape[2]) + k_offset
    if causal:
        s = s.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    if window:
        s = s.masked_fill(q_pos[:, None] - k_pos[None, :] >= window, float("-inf"))
    if documents is not None:
        other = documents[:, q_pos][:, :, None] != documents[:, k_pos][:, None, :]
        s = s.masked_fill(other[:, None], float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v, lse
