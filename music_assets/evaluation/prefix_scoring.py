"""Prefix-shared reward scoring for decoder reward models (no Dagster).

The sequences scored together often share most of their tokens: a MUSIC pair's two conversations
are equal up to the contrast turn, a seed pair up to its last answer, Best-of-N's candidates up to
the answer. A decoder's hidden states at a token depend only on the tokens before it, so the shared
prefix can run through the backbone once, by either of two kernels:
- packed rows (`packed_prefix_scores`): a group is one row `[prefix | suffix 1 | ... | suffix k]`
  with block attention (each suffix sees the prefix and itself: `training/prefix_attention`) and
  positions restarting after the prefix (the layout of packed training,
  `training/prefix_packing.pack_groups`), one forward, no cache; groups that open alike share a row
  as a tree (a seed pair and the MUSIC pair simulated from its conversation read their common
  opening once); for the Llama family (Llama, Mistral, Qwen2, Qwen3) with SDPA, eager or FlexAttention;
- a KV cache (`shared_prefix_scores`): the prefix with `use_cache=True`, then every suffix of its
  group against that cache; for any decoder with a cache (GPT-2, Gemma-2, sliding windows...).
The reward is read where `AutoModelForSequenceClassification` reads it for the whole sequence, at
the last token, through the model's own `score` head; the results equal full-sequence scoring
(`trainer.sequence_scores`) up to float rounding. `grouped_scores` picks the path per group.

Encoders (BERT, MiniLM) attend both ways and have no cache: `supports_prefix_sharing` says no and
the caller scores whole sequences as before. Truncation to the model's max length is the caller's,
before the split: the split is then exact for whatever tokens are left.
"""

from __future__ import annotations

import inspect
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from music_assets.common.sequences import common_prefix_length
from music_assets.training.prefix_packing import (add_to_tree, pack_groups, packed_forward, packing_refusal,
                                                    tree_length)
from music_assets.training.trainer import batch_budget, length_batches, sequence_scores


# Below this many shared tokens a group is scored whole. Measured (benchmarks/prefix_sharing.py (d),
# SmolLM2-135M fp32, real HH pairs with their shared prefix cut to P tokens, CPU seconds, best of 2):
# packed rows pay at every length tried, one row per pair 1.27x at 8 tokens, 1.19x at 16, 1.33x at 32,
# 1.36x at 64 (a packed pair is one row with no padding between sides of unequal length, whereas full
# scoring pads each side to the batch's longest); the KV-cache kernel, with its second pass and cache
# copy, loses below 64 tokens (0.87x at 8, 0.95x at 16, 0.98x at 32), breaks even at 64 (1.01x) and
# pays on long prefixes (Best-of-8 2.28x).
MIN_SHARED_PREFIX_TOKENS = 8  # packed rows
MIN_CACHED_PREFIX_TOKENS = 64  # the KV-cache kernel
# Groups that open alike (a seed pair and the MUSIC pair simulated from its conversation, pairs on one
# prompt) share one packed row, every token they have in common read once (`shared_rows`), up to this
# many tokens per row or the device's batch budget where that is larger. A long row costs no more per
# token than the rows it replaces, because the block kernel computes each segment's attention on its
# own (SmolLM2-135M fp32, CPU: 2,048 random tokens as one row of 2-8 independent sequences vs one row
# each, 1.01-1.03x), so the cap is for memory only.
MAX_SHARED_ROW_TOKENS = 4096
# On a CPU, the MLPs of a packed row run this many tokens at a time (`prefix_packing.chunked_mlps`):
# past about a thousand tokens their activations fall out of cache and a long row costs 1.11-1.14x
# per token what short ones do; in chunks of 256, 512 and 1,024 tokens it cost 0.98-1.00x, so the
# middle one. A GPU wants its long rows whole.
CPU_MLP_CHUNK_TOKENS = 512


def supports_prefix_sharing(model) -> bool:
    """True for a decoder-only sequence classifier whose backbone takes a KV cache and whose reward
    is a linear `score` head on the last token's hidden state (Llama, Gemma, Qwen, Mistral, GPT-2...).

    False for encoders: BERT-like models pool a bidirectional encoding through `classifier`, so a
    token's state depends on what follows it and a prefix cannot be computed once for all suffixes.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = model.config
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return (
        not getattr(config, "is_encoder_decoder", False)
        and config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and isinstance(getattr(model, "score", None), torch.nn.Linear)
        and base is not None
        and "past_key_values" in inspect.signature(base.forward).parameters
    )


def split_shared_prefix(seqs: list[list[int]]) -> tuple[list[int], list[list[int]]]:
    """(longest common prefix, what each sequence adds to it). A suffix is empty when its sequence
    is the prefix itself (then its reward is read at the prefix's last token)."""
    if not seqs:
        raise ValueError("a group to split needs at least one sequence")
    n = common_prefix_length(seqs)
    return list(seqs[0][:n]), [list(s[n:]) for s in seqs]


@dataclass(frozen=True)
class _Group:
    index: int  # position in the caller's list
    prefix: list[int]
    suffixes: list[list[int]]

    @property
    def cost(self) -> int:
        return len(self.prefix) + sum(len(s) for s in self.suffixes)


@torch.inference_mode()
def shared_prefix_scores(model, groups: list[list[list[int]]], pad_id: int,
                         max_batch_tokens: int | None = None) -> list[list[float]]:
    """The reward of every sequence of every group (same nesting as `groups`), each group's longest
    common prefix run once, then its suffixes against the prefix's KV cache (copied per suffix).
    Groups of similar prefix length are batched together up to `max_batch_tokens` token slots
    (default by device); a group is never split across batches.

    `pad_id` only fills padding: every reward is read at its sequence's own last token, counted from
    the lengths, so a sequence may end with the pad token (the full-sequence path, which searches for
    the last non-pad id, would read one token early there).
    """
    if not supports_prefix_sharing(model):
        raise ValueError(f"{type(model).__name__} cannot share prefixes (not a decoder with a KV cache and a `score` "
                         "head); score its sequences whole with trainer.sequence_scores")
    parts = [_Group(i, *split_shared_prefix(_checked(g, i))) for i, g in enumerate(groups)]
    out: list[list[float]] = [[0.0] * len(g) for g in groups]
    with _evaluating(model) as device:
        for batch in _batches(parts, batch_budget(device, max_batch_tokens), _sliding_window(model)):
            for (gi, si), value in _score_batch(model, batch, pad_id, device).items():
                out[gi][si] = value
    return out


@torch.inference_mode()
def packed_prefix_scores(model, groups: list[list[list[int]]], pad_id: int, max_batch_tokens: int | None = None,
                         share_across_groups: bool = True) -> list[list[float]]:
    """The same rewards as `shared_prefix_scores` in one forward per batch and no cache: a row is the
    radix tree of a group's sequences (`prefix_packing.pack_groups`, the layout packed training uses:
    for a pair `[prefix | suffix 1 | suffix 2]`) whose block attention lets every segment see its
    ancestors and itself only, with positions running on from the ancestors. With
    `share_across_groups`, groups that open alike share a row (`shared_rows`), so what they have in
    common is read once too (the KV-cache path reads each group's prefix on its own). Batches hold rows
    of similar length up to `max_batch_tokens` slots (rows x the longest row); on a CPU the MLPs run
    `CPU_MLP_CHUNK_TOKENS` at a time. Only for the models `prefix_packing.packing_refusal` accepts."""
    refusal = packing_refusal(model)
    if refusal:
        raise ValueError(f"{type(model).__name__} cannot score packed rows: {refusal}")
    for i, g in enumerate(groups):
        _checked(g, i)
    base = getattr(model, model.base_model_prefix)
    out: list[list[float]] = [[] for _ in groups]
    with _evaluating(model) as device:
        budget = batch_budget(device, max_batch_tokens)
        chunk = CPU_MLP_CHUNK_TOKENS if device.type == "cpu" else None
        rows = (shared_rows(groups, max(budget, MAX_SHARED_ROW_TOKENS)) if share_across_groups
                else [[i] for i in range(len(groups))])
        row_seqs = [[s for i in row for s in groups[i]] for row in rows]
        for members in length_batches([tree_length(seqs) for seqs in row_seqs], budget):
            batch = [row_seqs[m] for m in members]
            packed = pack_groups(batch, pad_id)
            packed.input_ids, packed.position_ids = packed.input_ids.to(device), packed.position_ids.to(device)
            hidden = packed_forward(base, packed, mlp_chunk=chunk).last_hidden_state
            row = torch.tensor([b for b, seqs in enumerate(batch) for _ in seqs], device=device)
            nth = torch.tensor([j for seqs in batch for j in range(len(seqs))], device=device)
            values = iter(_reward(model, hidden[row, packed.reward_index.to(device)[row, nth]]))
            for m in members:
                for i in rows[m]:
                    out[i] = [next(values) for _ in groups[i]]
    return out


def shared_rows(groups: list[list[list[int]]], max_tokens: int) -> list[list[int]]:
    """Which groups share a packed row (indices of `groups`, each once). Groups are taken in token
    order of their first sequence, so groups that open alike are neighbours; a group joins the row
    before it when it shares at least `MIN_SHARED_PREFIX_TOKENS` leading tokens with that row's last
    group and the row's tree (`prefix_packing.tree_row`) stays within `max_tokens`. A group longer
    than that is a row of its own."""
    rows: list[list[int]] = []
    members: list[list[list[int]]] = []  # each row's sequences in token order, for `add_to_tree`
    sizes: list[int] = []  # each row's tree tokens
    for i in sorted(range(len(groups)), key=lambda i: list(groups[i][0])):
        if rows and common_prefix_length([groups[rows[-1][-1]][0], groups[i][0]]) >= MIN_SHARED_PREFIX_TOKENS:
            ordered = list(members[-1])
            size = sizes[-1] + sum(add_to_tree(ordered, seq) for seq in groups[i])
            if size <= max_tokens:
                rows[-1].append(i)
                members[-1], sizes[-1] = ordered, size
                continue
        ordered = []
        rows.append([i])
        sizes.append(sum(add_to_tree(ordered, seq) for seq in groups[i]))
        members.append(ordered)
    return rows


def _kernel(model):
    """(scoring function, path name, fewest shared tokens for it) of the fastest exact path that
    `model` allows (see `grouped_scores`); (None, 'full', 0) for encoders."""
    if packing_refusal(model) is None:
        return packed_prefix_scores, "prefix_packed", MIN_SHARED_PREFIX_TOKENS
    if supports_prefix_sharing(model):
        return shared_prefix_scores, "prefix_cached", MIN_CACHED_PREFIX_TOKENS
    return None, "full", 0


def group_paths(model, groups: list[list[list[int]]]) -> list[str]:
    """The path `grouped_scores` takes for each group: its shared-prefix path when the group has
    two or more sequences sharing enough tokens, else 'full'."""
    kernel, path, least = _kernel(model)
    return [path if kernel and len(g) > 1 and common_prefix_length(g) >= least else "full" for g in groups]


def grouped_scores(model, groups: list[list[list[int]]], pad_id: int,
                   paths: list[str] | None = None) -> tuple[list[list[float]], Counter]:
    """Every group's rewards by the fastest exact path, and how many sequences each path scored:
    'prefix_packed' (`packed_prefix_scores`: the Llama family with SDPA, eager or FlexAttention),
    'prefix_cached' (`shared_prefix_scores`: other decoders with a KV cache), each only for groups
    whose sequences share at least `MIN_SHARED_PREFIX_TOKENS` or `MIN_CACHED_PREFIX_TOKENS`; else
    'full' (encoders, short prefixes, single sequences). All give the same rewards up to float
    rounding, so the choice is only about speed (`group_paths` says which path each group takes; a
    caller that records it passes it in as `paths`).

    Why packed first (benchmarks/prefix_sharing.py, SmolLM2-135M on real pairs, CPU seconds): real
    candidates differ in length, and the cache path pads every suffix of a batch to the longest and
    copies the prefix's cache per suffix, while a packed row holds each suffix at its own length and
    rows can share what groups have in common; Best-of-8 on real conversations ran 3.83x faster than
    full-sequence scoring packed, 1.92x cached, seed pairs 1.49-1.89x packed, 1.15-1.24x cached."""
    kernel, path, _ = _kernel(model)
    paths = paths if paths is not None else group_paths(model, groups)
    shared = [i for i, p in enumerate(paths) if p != "full"]
    whole = [i for i, p in enumerate(paths) if p == "full"]
    out: list[list[float]] = [[] for _ in groups]
    for i, scores in zip(shared, kernel(model, [groups[i] for i in shared], pad_id) if shared else []):
        out[i] = scores
    flat = sequence_scores(model, [s for i in whole for s in groups[i]], pad_id) if whole else []
    at = 0
    for i in whole:
        out[i], at = flat[at: at + len(groups[i])], at + len(groups[i])
    counts = Counter({path: sum(len(groups[i]) for i in shared), "full": len(flat)})
    return out, +counts


def _checked(group: list[list[int]], i: int) -> list[list[int]]:
    if not group:
        raise ValueError(f"group {i}: no sequences to score")
    for j, seq in enumerate(group):
        if not seq:
            raise ValueError(f"group {i}, sequence {j}: empty token sequence (there is no last token to score)")
    return group


@contextmanager
def _evaluating(model):
    """The model in eval mode (dropout off) for the block, then back to its own mode; yields its device."""
    was_training = model.training
    model.eval()
    try:
        yield next(model.parameters()).device
    finally:
        model.train(was_training)


def _sliding_window(model) -> int | None:
    window = getattr(model.config.get_text_config(), "sliding_window", None)
    return window if isinstance(window, int) and window > 0 else None


def _batches(parts: list[_Group], budget: int, window: int | None) -> list[list[_Group]]:
    """Greedy packing in prefix-length order, so that prefixes padded to a batch's longest are
    similar. Groups without a shared prefix batch only among themselves (they need no cache pass).
    Under a sliding window, a group longer than the window goes alone: the window counts cache slots,
    and padding between a short prefix and its suffix would hide real tokens from it."""
    order = sorted(parts, key=lambda g: (len(g.prefix) > 0, len(g.prefix), g.cost))
    batches: list[list[_Group]] = []
    closed = True  # the last batch takes no more groups
    for g in order:
        alone = window is not None and len(g.prefix) + max(len(s) for s in g.suffixes) > window
        if (not closed and not alone and (len(batches[-1][0].prefix) > 0) == (len(g.prefix) > 0)
                and _slots(batches[-1] + [g]) <= budget):
            batches[-1].append(g)
        else:
            batches.append([g])
        closed = alone
    return batches


def _slots(batch: list[_Group]) -> int:
    """Token slots a batch computes, padding included: each prefix padded to the longest, each
    non-empty suffix padded to the longest."""
    rows = [s for g in batch for s in g.suffixes if s]
    return len(batch) * max(len(g.prefix) for g in batch) + len(rows) * max((len(s) for s in rows), default=0)


def _pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and their 0/1 mask; width 0 when every sequence is empty."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def _score_batch(model, batch: list[_Group], pad_id: int, device) -> dict[tuple[int, int], float]:
    """{(group, sequence): reward} for one batch: one pass over the right-padded prefixes, then one
    over all non-empty suffixes, each row against its own group's cache row.

    Right padding leaves a gap of masked slots between a short prefix and its suffix; the gap is
    harmless because the mask hides it and the position ids are given explicitly (a suffix token's
    position is its prefix's real length plus its offset), so rotary embeddings see the positions
    the whole sequence would have."""
    base = getattr(model, model.base_model_prefix)
    prefix_ids, prefix_mask = _pad([g.prefix for g in batch], pad_id, device)
    prefix_lens = prefix_mask.sum(1)
    scores: dict[tuple[int, int], float] = {}
    cache = None
    if prefix_ids.shape[1]:
        positions = torch.arange(prefix_ids.shape[1], device=device).expand_as(prefix_ids)
        run = base(input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=positions, use_cache=True)
        cache = run.past_key_values
        ends = run.last_hidden_state[torch.arange(len(batch), device=device), prefix_lens - 1]
        for b, g in enumerate(batch):
            for j, s in enumerate(g.suffixes):
                if not s:
                    scores[(g.index, j)] = _reward(model, ends[b : b + 1])[0]
    rows = [(b, j) for b, g in enumerate(batch) for j, s in enumerate(g.suffixes) if s]
    if not rows:
        return scores
    owner = torch.tensor([b for b, _ in rows], device=device)
    suffixes = [batch[b].suffixes[j] for b, j in rows]
    ids, mask = _pad(suffixes, pad_id, device)
    positions = prefix_lens[owner].unsqueeze(1) + torch.arange(ids.shape[1], device=device)
    if cache is not None:
        cache.reorder_cache(owner)  # index_select on the batch axis: one cache row per suffix
    run = base(input_ids=ids, attention_mask=torch.cat([prefix_mask[owner], mask], dim=1), position_ids=positions,
               past_key_values=cache, use_cache=cache is not None)
    lens = torch.tensor([len(s) for s in suffixes], device=device)
    values = _reward(model, run.last_hidden_state[torch.arange(len(rows), device=device), lens - 1])
    for (b, j), v in zip(rows, values):
        scores[(batch[b].index, j)] = v
    return scores


def _reward(model, hidden: torch.Tensor) -> list[float]:
    """The score head on last-token hidden states: what the sequence classifier pools, first label."""
    return model.score(hidden)[:, 0].float().tolist()
