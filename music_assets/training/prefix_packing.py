"""Prefix-shared Bradley-Terry training for decoder reward models: a pair's shared context runs once.

Chosen and rejected usually share a long context (the conversation so far) and differ only in the
last reply. The usual forward encodes each side in full, so the context's forward and backward run
twice. Here a pair is packed as `[shared prefix | chosen suffix | rejected suffix]`, with

- block attention: every token attends causally to the prefix and to the earlier tokens of its own
  segment; the rejected suffix never sees the chosen suffix (`attention_mask` is that rule as a dense
  bool mask; the forward runs `prefix_attention`, which computes exactly the allowed blocks);
- position ids that restart after the prefix: both suffixes run from `prefix_length`, so each
  suffix token has exactly the position (and, with RoPE, the attention scores) it would have in its
  side encoded alone;
- the two reward positions per pair: the last token of each suffix, or the prefix's last token
  when a suffix is empty (that side *is* the prefix, and causality makes the prefix's last hidden
  state that side's last hidden state).

So r_chosen and r_rejected equal the unpacked ones up to float rounding, and so do the loss and every
gradient (tests/training/test_prefix_packing.py checks this to 1e-4 in fp32, also under DDP and FSDP2).
The layout is not limited to two suffixes: `pack_groups` packs any group of sequences as the radix
tree of their tokens (every run of tokens that several sequences share, once), under the same rules
with ancestors in place of the one prefix; a pair is its group of two, a root and two children, and
prefix-shared scoring (`evaluation/prefix_scoring.packed_prefix_scores`) packs Best-of-N's N candidates
and several pairs that open alike.

Training packs a whole micro-batch as one row, the tree of all its sides (`pack_pairs(one_row=True)`):
nothing is padded (per-pair rows pad to the micro-batch's longest pair), and pairs that open alike read
their common opening once: a seed pair and the MUSIC pairs simulated from its conversation, when the
sampler puts them in one micro-batch (`training.group_by_conversation`), and every conversation's
template head (a default system prompt). A long row costs no more per token than several short ones,
because the kernels compute each segment's attention on its own: on real micro-batches one row ran
1.44x a row per pair (benchmarks/README.md, "Prefix sharing").

Why block attention and not the dense mask SDPA could take: SDPA and eager attention compute every
query against every key of a row and mask afterwards, so a packed pair's attention cost (p + a + b)^2
instead of (p + a)^2 + (p + b)^2; at conversation lengths that ate most of what packing saved
(benchmarks/prefix_sharing.py). On a CPU the row layouts reach every layer as the `packed_layout`
keyword of the forward (transformers builds no mask for an attention implementation without a mask
function); on CUDA they become one FlexAttention block mask passed as the attention mask
(`prefix_attention.kernel_for`). Which models: the Llama code path of transformers 5.x (Llama,
Mistral, Qwen2, Qwen3), whose attention goes through `AttentionInterface` and applies RoPE from
`position_ids`, with full attention (a sliding window would be lost) and an SDPA, eager or
FlexAttention implementation configured (the one put back after each packed forward); others are
refused with the reason.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch

from music_assets.common.sequences import common_prefix_length
from music_assets.training.prefix_attention import RowLayout, flex_block_mask, kernel_for, packed_attention

# Model types whose transformers 5.x code calls the configured `AttentionInterface` function with the
# forward's keywords and applies RoPE from `position_ids` (the Llama code path; Mistral, Qwen2 and
# Qwen3 are generated from it). Each is checked against unpacked scoring in the tests; others (GPT-2's
# learned positions, Gemma-2's alternating sliding layers, encoders) are refused rather than assumed.
PACKABLE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# The configured implementations packing stands in for (flash kernels are left alone: their models
# run on GPUs where the user chose them on purpose).
REPLACEABLE_ATTENTION = frozenset({"sdpa", "eager", "flex_attention"})


class _Rows:
    """What packed rows of either kind derive from their `layout`."""

    input_ids: torch.Tensor
    layout: list[RowLayout]

    @property
    def prefix_lengths(self) -> list[int]:
        return [row.prefix for row in self.layout]

    @property
    def attention_mask(self) -> torch.Tensor:
        """The bool [B, 1, L, L] mask the layout means (what a dense-mask kernel would be given)."""
        return _allowed(self.layout, self.input_ids.shape[1])


@dataclass
class PackedBatch(_Rows):
    """Pairs packed into rows (`pack_pairs`). `layout` [B] says where each row's segments lie (what the
    attention kernel reads); `attention_mask` is the bool [B, 1, L, L] mask that layout means, True where
    a query (dim 2) may attend to a key (dim 3); `row`, `chosen_index` and `rejected_index` [P] say, per
    pair, which row it lies in and where each side's reward is read."""

    input_ids: torch.Tensor  # [B, L], right-padded with pad_id
    position_ids: torch.Tensor  # [B, L]
    row: torch.Tensor  # [P]
    chosen_index: torch.Tensor  # [P]
    rejected_index: torch.Tensor  # [P]
    layout: list[RowLayout]
    real_tokens: int  # tokens that are not padding (packed); the unpacked forward's would be sum(len(c) + len(r))

    def to(self, device) -> PackedBatch:
        move = {k: getattr(self, k).to(device) for k in ("input_ids", "position_ids", "row", "chosen_index",
                                                          "rejected_index")}
        return PackedBatch(**move, layout=self.layout, real_tokens=self.real_tokens)


def pair_prefix_length(chosen_ids: Sequence[int], rejected_ids: Sequence[int]) -> int:
    """How many leading tokens the two sides share (the part a packed row encodes once)."""
    return common_prefix_length([chosen_ids, rejected_ids])


def _sides(pair, row: int) -> tuple[list[int], list[int]]:
    """(chosen, rejected) token ids of an `EncodedPair`-like object or a (chosen, rejected) tuple."""
    chosen, rejected = (pair.chosen, pair.rejected) if hasattr(pair, "chosen") else pair
    for side, ids in (("chosen", chosen), ("rejected", rejected)):
        if len(ids) == 0:
            raise ValueError(f"pair {row}: the {side} side has no tokens; there is nothing to read its reward from")
    return list(chosen), list(rejected)


def pack_pairs(pairs: Sequence, pad_id: int, one_row: bool = True) -> PackedBatch:
    """Packs pairs (`EncodedPair`s or (chosen_ids, rejected_ids) tuples) with the mask, positions and
    reward indices above. `one_row` (what training runs): the whole micro-batch is one row, the radix
    tree of all its sides, so nothing is padded and pairs that open alike (a seed pair and the MUSIC
    pair simulated from its conversation; any two conversations under one system prompt) read their
    common opening once too; else one row `[prefix | chosen suffix | rejected suffix]` per pair,
    right-padded to the longest. Both give the same rewards: a token sees exactly the tokens before
    it in its own sequence either way."""
    if not pairs:
        raise ValueError("pack_pairs needs at least one pair")
    sides = [_sides(pair, row) for row, pair in enumerate(pairs)]
    if one_row:
        rows = pack_groups([[ids for pair in sides for ids in pair]], pad_id)
        return PackedBatch(rows.input_ids, rows.position_ids, torch.zeros(len(sides), dtype=torch.long),
                           rows.reward_index[0, 0::2], rows.reward_index[0, 1::2], rows.layout, rows.real_tokens)
    rows = pack_groups(sides, pad_id)
    return PackedBatch(rows.input_ids, rows.position_ids, torch.arange(len(sides)), rows.reward_index[:, 0],
                       rows.reward_index[:, 1], rows.layout, rows.real_tokens)


@dataclass
class PackedGroups(_Rows):
    """One row per group of sequences, the radix tree of their tokens: a pair is a group of two
    (`pack_pairs`), Best-of-N's candidates a group of N. `reward_index` [B, K] holds where sequence j
    of row b is read (K = the largest group; -1 past a smaller group's end)."""

    input_ids: torch.Tensor  # [B, L], right-padded with pad_id
    position_ids: torch.Tensor  # [B, L]
    reward_index: torch.Tensor  # [B, K]
    layout: list[RowLayout]
    real_tokens: int


def pack_groups(groups: Sequence[Sequence[Sequence[int]]], pad_id: int) -> PackedGroups:
    """Packs groups of token sequences (each sequence non-empty) into right-padded rows, one per group:
    the radix tree of the group's sequences (`tree_row`), each segment's positions running on from its
    ancestors' length, each sequence's reward index at its last token."""
    trees = [tree_row(seqs) for seqs in groups]
    width, most = max(len(t.ids) for t in trees), max(len(t.ends) for t in trees)
    input_ids = torch.full((len(trees), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(trees), width), dtype=torch.long)
    reward_index = torch.full((len(trees), most), -1, dtype=torch.long)
    for i, t in enumerate(trees):
        input_ids[i, : len(t.ids)] = torch.tensor(t.ids)
        position_ids[i, : len(t.ids)] = torch.tensor(t.positions)
        reward_index[i, : len(t.ends)] = torch.tensor(t.ends)
    return PackedGroups(input_ids, position_ids, reward_index, [t.layout for t in trees],
                        sum(len(t.ids) for t in trees))


@dataclass(frozen=True)
class TreeRow:
    """One group's packed row before padding: token ids, their positions, the segment tree, and the
    index each sequence's reward is read at."""

    ids: list[int]
    positions: list[int]
    layout: RowLayout
    ends: list[int]


def tree_row(seqs: Sequence[Sequence[int]]) -> TreeRow:
    """The radix tree of `seqs` laid out depth first: every run of tokens that a set of sequences
    shares becomes one segment under the segment they share before it, so each token of the group is
    encoded once. A pair gives `[common prefix | chosen suffix | rejected suffix]` (no prefix: two
    roots); a sequence that is a prefix of another is read at the last token of the segment it ends
    in (causality makes that token's hidden state the sequence's own). Branches keep the order of the
    sequences that open them."""
    ids: list[int] = []
    positions: list[int] = []
    segments: list[tuple[int, int, int]] = []
    ends = [-1] * len(seqs)

    def grow(members: list[int], depth: int, parent: int) -> None:
        n = common_prefix_length([seqs[m] for m in members], start=depth)
        if n:
            segments.append((len(ids), len(ids) + n, parent))
            parent = len(segments) - 1
            ids.extend(seqs[members[0]][depth: depth + n])
            positions.extend(range(depth, depth + n))
            depth += n
        branches: dict[int, list[int]] = {}
        for m in members:
            if len(seqs[m]) == depth:
                ends[m] = segments[parent][1] - 1
            else:
                branches.setdefault(seqs[m][depth], []).append(m)
        for branch in branches.values():
            grow(branch, depth, parent)

    for j, seq in enumerate(seqs):
        if len(seq) == 0:
            raise ValueError(f"sequence {j} has no tokens; there is nothing to read its reward from")
    grow(list(range(len(seqs))), 0, -1)
    return TreeRow(ids, positions, RowLayout(tuple(segments)), ends)


def tree_length(seqs: Sequence[Sequence[int]]) -> int:
    """Tokens of the packed row of `seqs` (`tree_row`): what one forward over them encodes. Counted
    without building the tree (`add_to_tree`), so sizing rows costs one pass over the tokens."""
    ordered: list[list[int]] = []
    return sum(add_to_tree(ordered, seq) for seq in seqs)


def add_to_tree(ordered: list[list[int]], seq: Sequence[int]) -> int:
    """Inserts `seq` into `ordered` (token lists in sorted order, the members of one packed row) and
    returns how many tokens that adds to the row's tree. A radix tree holds each distinct prefix once,
    so its size is the members' lengths less what each shares with the one before it in sorted order;
    inserting between neighbours a and b adds len(seq) - lcp(a, seq) - lcp(seq, b) + lcp(a, b)."""
    seq = list(seq)
    at = bisect.bisect(ordered, seq)
    before, after = ordered[at - 1] if at else None, ordered[at] if at < len(ordered) else None
    added = len(seq)
    if before is not None:
        added -= common_prefix_length([before, seq])
    if after is not None:
        added -= common_prefix_length([seq, after])
    if before is not None and after is not None:
        added += common_prefix_length([before, after])
    ordered.insert(at, seq)
    return added


def _allowed(layout: Sequence[RowLayout], width: int) -> torch.Tensor:
    """The bool [B, 1, L, L] mask the layouts mean: a token sees its own segment causally and its
    ancestor segments whole; a padding query sees only itself, and no real query sees padding."""
    mask = torch.zeros(len(layout), 1, width, width, dtype=torch.bool)
    for b, row in enumerate(layout):
        for i, (start, end, _) in enumerate(row.segments):
            for s, e in row.ancestors(i):
                mask[b, 0, start:end, s:e] = True
            mask[b, 0, start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool).tril()
        for t in range(row.end, width):
            mask[b, 0, t, t] = True
    return mask


def unwrap(model):
    """The Hugging Face model inside a DDP wrapper (FSDP2 shards the model in place: it is its own)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def packing_refusal(model) -> str | None:
    """Why `model` cannot be trained with packed pairs, or None when it can."""
    model = unwrap(model)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in PACKABLE_MODEL_TYPES:
        return (f"model type {model_type!r} is not one whose attention goes through AttentionInterface with RoPE "
                f"from position ids (packable: {', '.join(sorted(PACKABLE_MODEL_TYPES))}); encoders never are")
    if not isinstance(getattr(model, "score", None), torch.nn.Module):
        return f"{type(model).__name__} has no `score` head (load it with AutoModelForSequenceClassification)"
    if getattr(config, "sliding_window", None) is not None:
        return f"sliding-window attention (window {config.sliding_window}) would be lost in packed rows' block attention"
    attn = getattr(config, "_attn_implementation", None)
    if attn not in REPLACEABLE_ATTENTION:
        return (f"attention implementation {attn!r}: packed rows attend through their own block kernel in place of "
                "sdpa, eager or flex_attention only (load the model with one of those)")
    return None


def supports_prefix_packing(model) -> bool:
    """Whether `model` (bare or DDP-wrapped) is a decoder reward model that packed pairs give the same
    rewards as unpacked ones: a Llama-family type with a `score` head, full attention, SDPA, eager or FlexAttention."""
    return packing_refusal(model) is None


def packed_forward(model, rows: PackedGroups | PackedBatch, kernel: str | None = None, mlp_chunk: int | None = None):
    """`model(...)` (a backbone, a reward model, or either wrapped by DDP/FSDP2) on packed rows already
    on its device: block attention by the rows' layout (`prefix_attention`; `kernel` None picks it
    for the device: FlexAttention on CUDA, the blocks kernel elsewhere), positions restarting after
    each prefix, no cache. With `mlp_chunk`, every layer's MLP runs at most that many tokens at a time
    (`chunked_mlps`; scoring on CPUs)."""
    inner = unwrap(model)
    device = rows.input_ids.device
    kernel = kernel or kernel_for(device, inner.config, inner.training)
    if kernel == "flex":
        attend = {"attention_mask": flex_block_mask(rows.layout, rows.input_ids.shape[1], device)}
    else:
        attend = {"packed_layout": rows.layout}
    with packed_attention(inner.config, kernel), chunked_mlps(inner, mlp_chunk):
        return model(input_ids=rows.input_ids, position_ids=rows.position_ids, use_cache=False, **attend)


@contextmanager
def chunked_mlps(model, tokens: int | None):
    """Within the block, each decoder layer's MLP of `model` (a Llama-family backbone or reward model)
    runs on at most `tokens` tokens at a time and concatenates the results; nothing changes with
    `tokens` None. An MLP acts on each token alone, so the output is the same, up to the float
    rounding of smaller matrix products.

    Why: a packed row is long (a tree of several conversations, thousands of tokens), and on a CPU
    a matrix product or elementwise op over that many tokens' intermediate activations (4,096 tokens
    x 1,536 x 4 bytes = 25 MB per tensor for SmolLM2) runs out of cache: measured (SmolLM2-135M fp32,
    1 thread), one packed row of 8 x 512 random tokens took 1.11-1.14x the CPU time of the same
    sequences one per forward, and the gate/up products and their product were where (1.5x and 30x
    their per-token time at 512 tokens, profiled); with the MLP in chunks of 256-1,024 tokens the row
    ran at 0.98-1.00x. Attention and the other projections gain nothing from chunking (they were as
    fast or faster per token on the long row), and neither did training's forward and backward (a
    2,900-token row: 34.2-36.9 CPU s chunked, 34.8-35.3 whole), so only scoring chunks (on CPUs:
    `prefix_scoring.CPU_MLP_CHUNK_TOKENS`). transformers' `apply_chunking_to_forward` needs the
    length to be a multiple of the chunk, which packed rows never are, hence this."""
    mlps = [layer.mlp for layer in _decoder_layers(model)] if tokens else []
    for mlp in mlps:
        mlp.forward = partial(_in_chunks, type(mlp).forward.__get__(mlp), tokens)
    try:
        yield
    finally:
        for mlp in mlps:
            del mlp.forward  # the class's forward again


def _decoder_layers(model):
    """The decoder layers of a Llama-family backbone or of a reward model holding one."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no decoder `layers` whose MLPs could run in chunks")
    return layers


def _in_chunks(forward, tokens: int, hidden: torch.Tensor) -> torch.Tensor:
    """`forward` on `hidden` [B, L, H] in pieces of at most `tokens` tokens (rows x positions)."""
    if hidden.shape[0] * hidden.shape[1] <= tokens:
        return forward(hidden)
    step = max(1, tokens // hidden.shape[0])
    return torch.cat([forward(piece) for piece in hidden.split(step, dim=1)], dim=1)


def packed_pair_rewards(model, batch: PackedBatch, kernel: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected) [P], fp32, for a packed batch of P pairs in one forward pass.

    `model` is taken as given: the bare model, its DDP wrapper or an FSDP2-sharded one. The forward goes
    through the model's own `__call__` (`packed_forward`: the backbone with block attention by the rows'
    layout and their position ids, then `score`), never around it: DDP reduces gradients only for a
    forward that went through its wrapper (its reducer ignores the backward of any other), and FSDP2 gathers the root's weights (embeddings,
    norm, head) in the root module's forward hooks. The per-token scores are taken from the `score`
    head by a forward hook, and read at each pair's two reward positions; the model's own pooling (at
    its last non-pad token, one per row) is left unused.
    """
    inner = unwrap(model)
    refusal = packing_refusal(inner)
    if refusal:
        raise ValueError(f"prefix packing is not possible for this model: {refusal}")
    device = inner.get_input_embeddings().weight.device
    batch = batch.to(device)
    captured = []
    handle = inner.score.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        packed_forward(model, batch, kernel)
    finally:
        handle.remove()
    scores = captured[-1][..., 0].float()  # [B, L]
    return scores[batch.row, batch.chosen_index], scores[batch.row, batch.rejected_index]


def packed_rewards(model, pairs: Sequence, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`trainer.rewards` with packing: the same arguments and result, for a micro-batch of pairs."""
    return packed_pair_rewards(model, pack_pairs(pairs, pad_id))
