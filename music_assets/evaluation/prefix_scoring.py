"""Prefix-shared reward scoring for decoder reward models (no Dagster).

The sequences scored together often share most of their tokens: a MUSIC pair's two conversations
are equal up to the contrast turn, a seed pair up to its last answer, Best-of-N's candidates up to
the answer. A decoder's hidden states at a token depend only on the tokens before it, so the shared
prefix can run through the backbone once (`use_cache=True`) and every suffix of its group then runs
against that key/value cache. The reward is read where `AutoModelForSequenceClassification` reads
it for the whole sequence, at the last token, through the model's own `score` head; the results
equal full-sequence scoring (`trainer.sequence_scores`) up to float rounding.

Encoders (BERT, MiniLM) attend both ways and have no cache: `supports_prefix_sharing` says no and
the caller scores whole sequences as before. Truncation to the model's max length is the caller's,
before the split: the split is then exact for whatever tokens are left.
"""

from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import dataclass

import torch

# Token slots (padding included) per scoring batch: a prefix counts once per group, a suffix once per
# candidate. On a CPU small batches win (see trainer.CPU_SCORING_BATCH: about 1,000 tokens), a GPU
# wants large ones.
CPU_BATCH_TOKENS, GPU_BATCH_TOKENS = 2048, 32768


# Below this many shared tokens a group is scored whole: running the prefix, then the suffixes
# against its cache, costs two passes and a cache copy, which a short prefix does not pay back
# (benchmarks/prefix_scoring.py, SmolLM2-135M fp32 on this CPU: a 16-token prefix 0.93x, 48 tokens
# 1.15x, 0.2 of a 400-token pair 1.06x).
MIN_SHARED_PREFIX_TOKENS = 32


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
    shortest = min(len(s) for s in seqs)
    n = 0
    while n < shortest and all(s[n] == seqs[0][n] for s in seqs):
        n += 1
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
    common prefix run once. Groups of similar prefix length are batched together up to
    `max_batch_tokens` token slots (default by device); a group is never split across batches.

    `pad_id` only fills padding: every reward is read at its sequence's own last token, counted from
    the lengths, so a sequence may end with the pad token (the full-sequence path, which searches for
    the last non-pad id, would read one token early there).
    """
    if not supports_prefix_sharing(model):
        raise ValueError(f"{type(model).__name__} cannot share prefixes (not a decoder with a KV cache and a `score` "
                         "head); score its sequences whole with trainer.sequence_scores")
    parts = [_Group(i, *split_shared_prefix(_checked(g, i))) for i, g in enumerate(groups)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    budget = max_batch_tokens or (CPU_BATCH_TOKENS if device.type == "cpu" else GPU_BATCH_TOKENS)
    out: list[list[float]] = [[0.0] * len(g) for g in groups]
    try:
        for batch in _batches(parts, budget, _sliding_window(model)):
            for (gi, si), value in _score_batch(model, batch, pad_id, device).items():
                out[gi][si] = value
    finally:
        model.train(was_training)
    return out


def grouped_scores(model, groups: list[list[list[int]]], pad_id: int) -> tuple[list[list[float]], Counter]:
    """Every group's rewards by the cheaper exact path, and how many sequences each path scored:
    'prefix_shared' (a decoder, and a group whose sequences share at least
    `MIN_SHARED_PREFIX_TOKENS`) or 'full' (encoders, short prefixes, single sequences). Both give
    the same rewards up to float rounding, so the choice is only about speed."""
    from music_assets.training.trainer import sequence_scores

    decoder = supports_prefix_sharing(model)
    shared = [i for i, g in enumerate(groups)
              if decoder and len(g) > 1 and len(split_shared_prefix(g)[0]) >= MIN_SHARED_PREFIX_TOKENS]
    chosen = set(shared)
    whole = [i for i in range(len(groups)) if i not in chosen]
    out: list[list[float]] = [[] for _ in groups]
    for i, scores in zip(shared, shared_prefix_scores(model, [groups[i] for i in shared], pad_id) if shared else []):
        out[i] = scores
    flat = sequence_scores(model, [s for i in whole for s in groups[i]], pad_id) if whole else []
    at = 0
    for i in whole:
        out[i], at = flat[at: at + len(groups[i])], at + len(groups[i])
    paths = Counter({"prefix_shared": sum(len(groups[i]) for i in shared), "full": len(flat)})
    return out, +paths


def _checked(group: list[list[int]], i: int) -> list[list[int]]:
    if not group:
        raise ValueError(f"group {i}: no sequences to score")
    for j, seq in enumerate(group):
        if not seq:
            raise ValueError(f"group {i}, sequence {j}: empty token sequence (there is no last token to score)")
    return group


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
