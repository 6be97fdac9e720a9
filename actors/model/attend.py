"""Grouped-query attention of a padded batch against its KV cache.

On CPU, where the compiled kernel runs (``csrc/row_attention.cpp``, built
with the block kernel), attention is computed one query row at a time over
exactly the keys that row's mask lets it see, in one fixed order of
operations. A row's output then depends on its query and its visible keys
and values alone: a k-token verify's rows equal k one-token decodes bit for
bit, whatever the padded context length, batch or token tree around them.
Batched matmuls and softmax reduce over the padded context in blockings
that move with its length, so the same row could round differently in a
verify than in a decode, and greedy speculation could part from target-only
decoding at a near-tie (it did, after a prefix-cache hit changed how the
prompt was split between forwards). The kernel stores no scores, so long
prefills take it too. It has no backward: training keeps torch's path.

Without the kernel (no compiler, ``SPECRAY_BLOCK_KERNEL=off``, head sizes it
does not take): ``F.scaled_dot_product_attention`` picks its flash kernel,
which pays a large fixed cost per (sequence, head) when each sequence has
only a few queries (1.2-1.7 ms per layer for 8 one-token decodes at 200
positions of context on this 2-core machine, against 0.18 ms for the plain
grouped matmuls below; Qwen2.5-0.5B shapes). The grouped path computes
scores and softmax in float32, as the flash kernel accumulates, so bf16
outputs match it to bf16 rounding. It materialises the scores, so long
prefills (and every GPU) keep the fused kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from specray.actors.parallel.block_kernel import (
    DTYPE_CODES,
    BlockKernelUnavailable,
    load_block_kernel,
)

# Float32 score elements (batch x heads x queries x keys) up to which the
# grouped matmul path runs: 16 M is 64 MiB of scores.
GROUPED_SCORE_BUDGET = 1 << 24
# What torch's profiler calls one row-kernel attention (bench/decode_profile.py).
PROFILER_NAME = "specray::row_attention"


def attend(
    query: torch.Tensor,  # [batch, heads, max_new, head_dim]
    keys: torch.Tensor,  # [batch, kv_heads, context_len, head_dim]
    values: torch.Tensor,  # [batch, kv_heads, context_len, head_dim]
    mask: torch.Tensor,  # [batch, 1, max_new, context_len] bool: query may see key
    scale: float,
) -> torch.Tensor:  # [batch, heads, max_new, head_dim], query's dtype
    batch, heads, new, head_dim = query.shape
    kv_heads, context = keys.shape[1], keys.shape[2]
    if query.device.type == "cpu":
        out = _row_by_row(query, keys, values, mask, scale)
        if out is not None:
            return out
    if query.device.type != "cpu" or batch * heads * new * context > GROUPED_SCORE_BUDGET:
        return F.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, scale=scale, enable_gqa=True
        )
    group = heads // kv_heads  # query head h reads kv head h // group
    grouped = query.float().reshape(batch, kv_heads, group * new, head_dim)
    scores = torch.matmul(grouped, keys.float().transpose(-1, -2)).mul_(scale)
    bias = mask_bias(mask)
    scores = scores.view(batch, kv_heads, group, new, context).add_(
        bias.view(batch, 1, 1, new, context)
    )
    probs = torch.softmax(scores, dim=-1).view(batch, kv_heads, group * new, context)
    out = torch.matmul(probs, values.float())
    return out.view(batch, heads, new, head_dim).to(query.dtype)


def mask_bias(
    mask: torch.Tensor,  # [batch, 1, max_new, context_len] bool: query may see key
) -> torch.Tensor:  # as mask, float32: 0 where visible, -inf elsewhere
    """The mask as the additive float32 bias :func:`attend` adds to scores.

    Every row keeps at least one visible key (padding queries repeat the
    last real position), so no row of scores is all -inf."""
    bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    return bias.masked_fill_(~mask, float("-inf"))


def _row_by_row(
    query: torch.Tensor,  # [batch, heads, max_new, head_dim]
    keys: torch.Tensor,  # [batch, kv_heads, context_len, head_dim]
    values: torch.Tensor,  # [batch, kv_heads, context_len, head_dim]
    mask: torch.Tensor,  # [batch, 1, max_new, context_len] bool
    scale: float,
) -> torch.Tensor | None:  # None: the kernel cannot take these here
    if torch.is_grad_enabled() and (
        query.requires_grad or keys.requires_grad or values.requires_grad
    ):
        return None  # training: the kernel has no backward
    try:
        kernel = load_block_kernel()
    except BlockKernelUnavailable:
        return None
    if keys.dtype != values.dtype or keys.stride(-1) != 1 or values.stride(-1) != 1:
        return None
    if keys.stride(-2) != keys.shape[-1] or values.stride(-2) != values.shape[-1]:
        return None
    if query.dtype not in DTYPE_CODES or keys.dtype not in DTYPE_CODES:
        return None
    visible = mask.reshape(mask.shape[0], mask.shape[2], mask.shape[3]).contiguous()
    if torch.autograd._profiler_enabled():
        # torch's profiler sees operators only; name the kernel's call for it.
        with torch.profiler.record_function(PROFILER_NAME):
            return kernel.row_attention(query.contiguous(), keys, values, visible, scale)
    return kernel.row_attention(query.contiguous(), keys, values, visible, scale)
