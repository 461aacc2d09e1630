"""Attention for packed rows that computes only what their block mask allows (no Dagster).

A packed row holds a tree of token segments (`prefix_packing.pack_groups`): a pair is
`[prefix | chosen suffix | rejected suffix]`, a root and two children; sequences that share more than
one prefix (Best-of-N candidates opening alike, a seed pair and the MUSIC pair simulated from its
conversation) nest deeper. Each token sees, causally, its own segment and the whole of every ancestor
segment, nothing else. Under a dense `[L, L]` mask, SDPA and eager attention still compute every query
against every key of the row and mask most of it away afterwards: the attention of a packed pair then
costs (p + a + b)^2 where the two sequences read whole cost (p + a)^2 + (p + b)^2, and at conversation
lengths (1,000-2,000 tokens, where attention is a third of a small model's FLOPs) packing lost most of
what reading the prefix once saves.

This kernel runs the blocks that the tree allows and no others, with PyTorch's SDPA: each segment's
queries against `[its ancestors' keys | its own keys]` under a causal mask aligned to the bottom right
(a token at offset i sees every ancestor token and its own segment up to i); a root runs plainly
causal. That is what a KV cache of the ancestors gives each segment, without a cache or its copy per
branch; the attention FLOPs are the least any exact method needs. Padding after the row's last segment
gets zeros (nothing reads it; no NaN can reach the real tokens).

It plugs into transformers through its documented extension point: registered with
`AttentionInterface` under `NAME` and selected for the duration of one forward by `packed_attention`
(the row layouts travel to every layer as the `packed_layout` keyword, the way flash-attention's
varlen offsets do). The attention implementation that was set before is put back afterwards.
Gradients flow through SDPA and `torch.cat`, so packed training uses it too.

That kernel is the CPU form: a Python loop with one SDPA call per segment (and per query block) in
every layer, which costs nothing next to a CPU's matmuls (measured: a 2,048-token row of 2-8 sequences
runs at 1.01-1.03x the time of the same tokens one sequence a row) but would be thousands of small
kernel launches per forward on a GPU, where a 135M model's whole forward over 32k tokens takes
milliseconds. On CUDA the same rule runs as one fused FlexAttention call per layer instead
(`kernel_for`): the rule becomes a `mask_mod` over two small tables (each token's segment; which
segments each segment sees), `create_block_mask` turns it into a block-sparse mask once per forward,
and transformers' own `flex_attention` implementation (compiled by transformers, GQA included) takes
it as the attention mask; blocks the tree rules out are skipped, not computed and masked. PyTorch's
FlexAttention has no backward on CPUs, so there its forward is tested (scoring equals full-sequence
scoring) and the blocks kernel stays the CPU's; `scripts/gpu_check.py` compares packed and unpacked
loss and gradients, and times both, on the GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NAME = "music_prefix_shared"
# transformers' FlexAttention implementation: given a `BlockMask` as the attention mask it passes it
# to `flex_attention` unchanged (masking_utils takes a 4-D mask as final).
FLEX = "flex_attention"
KERNELS = ("blocks", "flex")


@dataclass(frozen=True)
class RowLayout:
    """One packed row as a tree of segments laid end to end from position 0, in depth-first order:
    `(start, end, parent)` with `parent` the index of an earlier segment, or -1 for a root. A token
    sees its own segment causally and every ancestor segment whole. Padding follows the last segment."""

    segments: tuple[tuple[int, int, int], ...]

    @property
    def end(self) -> int:
        return self.segments[-1][1] if self.segments else 0

    @property
    def prefix(self) -> int:
        """Tokens every sequence of the row shares: the root's when it is the only root, else 0."""
        roots = [(start, end) for start, end, parent in self.segments if parent < 0]
        return roots[0][1] - roots[0][0] if len(roots) == 1 else 0

    def ancestors(self, i: int) -> list[tuple[int, int]]:
        """The [start, end) spans that segment `i` sees whole, root first."""
        chain, parent = [], self.segments[i][2]
        while parent >= 0:
            start, end, parent_of = self.segments[parent]
            chain.append((start, end))
            parent = parent_of
        return chain[::-1]


# A segment below ancestors runs its queries in blocks of this many, each against the keys up to its own
# end. With an explicit mask SDPA's CPU flash kernel computes every block of scores, masked or not, so
# one call would spend half its own n x n block on scores the mask drops; in blocks the waste is
# n x QUERY_BLOCK / 2. Measured (SmolLM2's 9 heads of 64, 1 thread): n = 600 after 900 ancestor tokens
# 0.90x the time of one call, 800 after 300 0.77x, 1,500 after 100 0.69x; 250 after 1,200 1.09x, so
# segments of up to 2 blocks stay one call.
QUERY_BLOCK = 128


def _gqa(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[1, H_kv, L, D] -> [1, H_kv * groups, L, D], each key/value head repeated for its query heads (as
    transformers' `repeat_kv` does)."""
    if groups == 1:
        return x
    one, heads, length, dim = x.shape
    return x[:, :, None].expand(one, heads, groups, length, dim).reshape(one, heads * groups, length, dim)


def _take(x: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    """The tokens of `spans` of x [1, H, L, D], in order (a view for one span, a copy for more)."""
    if len(spans) == 1:
        return x[:, :, spans[0][0]: spans[0][1]]
    return torch.cat([x[:, :, s:e] for s, e in spans], dim=2)


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
        q, k, v = query[b: b + 1], key[b: b + 1], value[b: b + 1]
        pieces = []
        for i, (start, end, _) in enumerate(layout.segments):
            spans = [*layout.ancestors(i), (start, end)]
            seen, n = sum(e - s for s, e in spans[:-1]), end - start
            keys, values = (_gqa(_take(x, spans), groups) for x in (k, v))
            if not seen:  # a root: plainly causal
                pieces.append(F.scaled_dot_product_attention(q[:, :, start:end], keys, values, is_causal=True,
                                                             scale=scaling, dropout_p=dropout))
                continue
            block = QUERY_BLOCK if n > 2 * QUERY_BLOCK else n
            for lo in range(0, n, block):  # queries [lo, hi) see the ancestors and their segment up to hi
                hi = min(n, lo + block)
                mask = torch.ones(hi - lo, seen + hi, dtype=torch.bool, device=q.device).tril(diagonal=seen + lo)
                pieces.append(F.scaled_dot_product_attention(q[:, :, start + lo: start + hi], keys[:, :, : seen + hi],
                                                             values[:, :, : seen + hi], attn_mask=mask, scale=scaling,
                                                             dropout_p=dropout))
        if layout.end < width:
            pieces.append(q.new_zeros(1, q.shape[1], width - layout.end, q.shape[3]))
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def register() -> None:
    """Makes `NAME` an attention implementation transformers knows (idempotent)."""
    from transformers import AttentionInterface

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, prefix_shared_attention)


def kernel_for(device: torch.device, config, training: bool) -> str:
    """Which kernel packed rows on `device` attend with: `flex` on CUDA (one fused call per layer;
    FlexAttention has no dropout, so not while training with attention dropout), `blocks` elsewhere
    (the CPU form, measured in benchmarks/prefix_sharing.py)."""
    dropout = float(getattr(config, "attention_dropout", 0.0) or 0.0) if training else 0.0
    return "flex" if device.type == "cuda" and not dropout else "blocks"


def layout_mask_mod(layout: Sequence[RowLayout], width: int, device: torch.device | str = "cpu"):
    """The layouts' rule as FlexAttention's `mask_mod(b, h, q, kv)`: key kv is visible to query q when
    kv <= q and kv's segment is q's own or one of its ancestors (all of which precede it, depth first).
    Two tables carry the rule: `segment` [B, L], each token's segment index, padding the extra last one;
    `sees` [B, S + 1, S + 1], True where segment i may read segment j (itself and its ancestors: a
    segment's row is its parent's plus itself). Padding sees only padding up to itself (so no query
    is empty) and no real token sees padding: the `_allowed` dense mask's rule, except that a padding
    query also sees the padding before it, which nothing reads."""
    most = max((len(row.segments) for row in layout), default=0) + 1  # + 1: the padding segment
    segment = torch.full((len(layout), width), most - 1, dtype=torch.long)
    sees = torch.zeros(len(layout), most, most, dtype=torch.bool)
    for b, row in enumerate(layout):
        for i, (start, end, parent) in enumerate(row.segments):
            segment[b, start:end] = i
            if parent >= 0:
                sees[b, i] = sees[b, parent]
            sees[b, i, i] = True
        sees[b, most - 1, most - 1] = True
    segment, sees = segment.to(device), sees.to(device)

    def mask_mod(b, h, q, kv):
        return (kv <= q) & sees[b, segment[b, q], segment[b, kv]]

    return mask_mod


def flex_block_mask(layout: Sequence[RowLayout], width: int, device: torch.device):
    """The block-sparse `BlockMask` of rows `layout` padded to `width`, built once per forward and
    shared by every layer. On CUDA its construction is compiled (`_compile`, as transformers builds
    its own block masks), so it never materialises a dense [B, L, L] mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(layout_mask_mod(layout, width, device), len(layout), None, width, width,
                             device=device, _compile=torch.device(device).type == "cuda")


@contextmanager
def packed_attention(config, kernel: str = "blocks"):
    """Within the block, the model of `config` attends through `prefix_shared_attention` (kernel
    `blocks`; every forward inside passes `packed_layout=` and no attention mask) or transformers'
    FlexAttention (`flex`; every forward passes `flex_block_mask` as its attention mask); afterwards
    its implementation is the one it had."""
    if kernel not in KERNELS:
        raise ValueError(f"packed attention kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    register()
    before = config._attn_implementation
    config._attn_implementation = NAME if kernel == "blocks" else FLEX
    try:
        yield
    finally:
        config._attn_implementation = before
