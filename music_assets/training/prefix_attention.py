"""Attention for packed rows that computes only what their block mask allows (no Dagster).

A packed row `[prefix | suffix 1 | ... | suffix k]` (`prefix_packing.pack_groups`) lets the prefix's
tokens see the prefix (causally) and each suffix's tokens see the prefix and their own suffix. Under a
dense `[L, L]` mask, SDPA and eager attention still compute every query against every key of the row
and mask most of it away afterwards: the attention of a packed pair then costs (p + a + b)^2 where the
two sequences read whole cost (p + a)^2 + (p + b)^2, and at conversation lengths (1,000-2,000 tokens,
where attention is a third of a small model's FLOPs) packing lost most of what reading the prefix
once saves.

This kernel runs the blocks that the mask allows and no others, with PyTorch's SDPA: the prefix
against itself (causal), then each suffix's queries against `[prefix keys | its own keys]` under a
causal mask aligned to the bottom right (a suffix token at offset i sees the whole prefix and its
suffix up to i). That is what a KV cache of the prefix gives each suffix, without a cache or its copy
per suffix; the attention FLOPs are p^2 + sum_j n_j (p + n_j), the least any exact method needs.
Padding after the row's last suffix gets zeros (nothing reads it; no NaN can reach the real tokens).

It plugs into transformers through its documented extension point: registered with
`AttentionInterface` under `NAME` and selected for the duration of one forward by `packed_attention`
(the row layouts travel to every layer as the `packed_layout` keyword, the way flash-attention's
varlen offsets do). The attention implementation that was set before is put back afterwards.
Gradients flow through SDPA and `torch.cat`, so packed training uses it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NAME = "music_prefix_shared"


@dataclass(frozen=True)
class RowLayout:
    """One packed row: its prefix length and the [start, end) span of each non-empty suffix, in order,
    right after the prefix and after each other (padding follows the last)."""

    prefix: int
    spans: tuple[tuple[int, int], ...]

    @property
    def end(self) -> int:
        return self.spans[-1][1] if self.spans else self.prefix


def _gqa(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[1, H_kv, L, D] -> [1, H_kv * groups, L, D], each key/value head repeated for its query heads (as
    transformers' `repeat_kv` does)."""
    if groups == 1:
        return x
    one, heads, length, dim = x.shape
    return x[:, :, None].expand(one, heads, groups, length, dim).reshape(one, heads * groups, length, dim)


def prefix_shared_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                            packed_layout: Sequence[RowLayout] | None = None, **kwargs):
    """The `AttentionInterface` function: query [B, H, L, D], key/value [B, H_kv, L, D] in, the output
    [B, L, H, D] and no weights out, as transformers' SDPA function returns them. `attention_mask` is
    ignored (transformers builds none for an implementation without a mask function): the layout
    says everything."""
    if packed_layout is None or len(packed_layout) != query.shape[0]:
        raise ValueError(f"{NAME} attention needs one RowLayout per row as `packed_layout` (got "
                         f"{None if packed_layout is None else len(packed_layout)} for {query.shape[0]} rows); "
                         "use it through prefix_attention.packed_attention")
    groups = query.shape[1] // key.shape[1]
    width, dropout = query.shape[2], dropout if module.training else 0.0
    rows = []
    for b, layout in enumerate(packed_layout):
        # 4-D slices [1, H, L, D]: PyTorch's CPU SDPA takes its flash kernel only for 4-D inputs and falls
        # back to the math kernel (scores materialised, softmax, masking) for 3-D ones, 2-4.5x slower here.
        q, k, v, p = query[b: b + 1], key[b: b + 1], value[b: b + 1], layout.prefix
        pieces = []
        if p:
            pieces.append(F.scaled_dot_product_attention(q[:, :, :p], _gqa(k[:, :, :p], groups),
                                                         _gqa(v[:, :, :p], groups),
                                                         is_causal=True, scale=scaling, dropout_p=dropout))
        for start, end in layout.spans:
            n = end - start
            keys = _gqa(torch.cat([k[:, :, :p], k[:, :, start:end]], dim=2), groups)
            values = _gqa(torch.cat([v[:, :, :p], v[:, :, start:end]], dim=2), groups)
            mask = torch.ones(n, p + n, dtype=torch.bool, device=q.device).tril(diagonal=p)
            pieces.append(F.scaled_dot_product_attention(q[:, :, start:end], keys, values, attn_mask=mask,
                                                         scale=scaling, dropout_p=dropout))
        if layout.end < width:
            pieces.append(q.new_zeros(1, q.shape[1], width - layout.end, q.shape[3]))
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def register() -> None:
    """Makes `NAME` an attention implementation transformers knows (idempotent)."""
    from transformers import AttentionInterface

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, prefix_shared_attention)


@contextmanager
def packed_attention(config):
    """Within the block, the model of `config` attends through `prefix_shared_attention`; afterwards
    its implementation is the one it had. Every forward inside must pass `packed_layout=` (and no
    attention mask)."""
    register()
    before = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = before
