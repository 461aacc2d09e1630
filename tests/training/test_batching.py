"""Which pairs train together: `trainer.step_batches` shuffles pairs in units (one pair, or with
`group_by_conversation` a seed conversation's pairs) and lays a unit out inside one micro-batch where
it fits, so that packed training (one row per micro-batch) reads the conversation's opening once."""

from __future__ import annotations

import random

import pytest
import torch

from music_assets.training.rm_data import EncodedPair
from music_assets.training.trainer import TrainConfig, conversation_units, fill_micro_batches, step_batches, train


def conversations(n: int, seed: int = 3) -> list[str]:
    """Group keys like a music-variant split's: a seed pair and 0-2 MUSIC pairs per conversation, some
    pairs with no group (""), listed in pair-id order (a conversation's pairs need not be adjacent)."""
    rng = random.Random(seed)
    keys = [k for c in range(n) for k in [f"conv-{c}"] * rng.choice((1, 2, 2, 3))] + [""] * (n // 10)
    rng.shuffle(keys)
    return keys


def whole_share(batches: list[list[int]], groups: list[str], micro: int) -> float:
    """Share of the conversations of 2..micro pairs, all trained this epoch, whose pairs are in one micro-batch."""
    where = {i: (b, j // micro) for b, batch in enumerate(batches) for j, i in enumerate(batch)}
    units = [u for u in conversation_units(groups) if 1 < len(u) <= micro and all(i in where for i in u)]
    return sum(len({where[i] for i in u}) == 1 for u in units) / len(units)


@pytest.mark.parametrize("micro", [2, 4, 8])
def test_a_conversations_pairs_share_a_micro_batch_and_every_pair_still_trains_once(micro):
    groups = conversations(400)
    rng = random.Random(0)
    base = {key: rng.randint(20, 900) for key in set(groups)}  # a conversation's pairs are of similar length
    lengths = [base[key] + rng.randint(0, 40) if key else rng.randint(20, 900) for key in groups]
    grouped = step_batches(lengths, 16, seed=0, epoch=0, group_by_length=True, groups=groups, micro_batch_size=micro)
    plain = step_batches(lengths, 16, seed=0, epoch=0, group_by_length=True)
    flat = [i for b in grouped for i in b]
    assert len(flat) == len(set(flat)) == len(groups) // 16 * 16 and all(len(b) == 16 for b in grouped)
    assert whole_share(grouped, groups, micro) >= 0.95
    assert whole_share(plain, groups, micro) < 0.5  # what the test tells apart: without grouping they scatter
    # deterministic in (seed, epoch); another epoch is another order
    assert grouped == step_batches(lengths, 16, 0, 0, True, groups, micro)
    assert grouped != step_batches(lengths, 16, 0, 1, True, groups, micro)
    # length grouping still holds inside its windows: a batch spans less than the data's length range
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in grouped) / len(grouped)
    assert spread < 0.2 * (max(lengths) - min(lengths))


def test_without_groups_the_order_is_a_plain_per_pair_shuffle():
    """No key (or "" everywhere, pairs whose group is unknown) gives exactly the batches of no grouping,
    for any micro-batch size: units of one pair change nothing."""
    lengths = [random.Random(1).randint(5, 300) for _ in range(203)]
    for by_length in (True, False):
        plain = step_batches(lengths, 8, 5, 2, by_length)
        assert plain == step_batches(lengths, 8, 5, 2, by_length, [""] * 203, 4)
        assert plain == step_batches(lengths, 8, 5, 2, by_length, [str(i) for i in range(203)], 2)


def test_micro_batches_are_filled_first_fit_and_big_conversations_fill_whole_ones():
    units = [[0, 1, 2], [3, 4], [5], [6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]
    order = fill_micro_batches(units, 4)
    # micro-batches [0 1 2 5] [3 4 9 10] [11 12 13 14], then what stayed part-full, run together: [6 7 8 15] [16]:
    # [5] fills the gap [0 1 2] left, [9 10] the one [3 4] left; the 6-pair conversation fills a micro-batch
    # whole and its rest starts another, as [6 7 8] did, for which nothing later fitted
    assert order == [0, 1, 2, 5, 3, 4, 9, 10, 11, 12, 13, 14, 6, 7, 8, 15, 16]
    assert fill_micro_batches([[0], [1], [2]], 1) == [0, 1, 2]


@pytest.mark.slow
def test_training_runs_a_conversations_pairs_in_one_packed_row(monkeypatch):
    """`train` with `group_by_conversation`: every micro-batch the model sees holds whole conversations
    (3 pairs each here, one seed pair and two MUSIC-like pairs sharing its opening), one packed row
    reads each conversation's opening once, and the loss is the unpacked loss on the same batches."""
    from music_assets.model_provisioning import resolve_model
    from music_assets.training import trainer
    from music_assets.training.prefix_packing import pack_pairs
    from music_assets.training.train_rm import load_backbone

    resolve_model("builtin:tiny-llama")
    rng = random.Random(0)
    pairs = []
    for c in range(8):
        opening = [rng.randint(20, 200) for _ in range(30)]
        for k in range(3):
            turn = [10 + k] + [rng.randint(20, 200) for _ in range(4 + k)]  # the pairs part at their first turn token
            pairs.append(EncodedPair(opening + turn + [1, 2], opening + turn + [3], f"p{c}-{k}", f"conv-{c}"))
    random.Random(1).shuffle(pairs)
    seen, tokens = [], []
    packed = trainer.packed_rewards

    def spy(model, chunk, pad_id):
        seen.append([p.group for p in chunk])
        tokens.append(pack_pairs(chunk, pad_id).real_tokens)
        return packed(model, chunk, pad_id)

    monkeypatch.setattr(trainer, "packed_rewards", spy)
    cfg = dict(max_length=64, batch_size=6, micro_batch_size=3, learning_rate=1e-3, max_steps=4, eval_every=0,
               log_every=1, group_by_length=False, group_by_conversation=True, precision="fp32")
    runs = {}
    for mode in ("on", "off"):
        model, _ = load_backbone("builtin:tiny-llama", 0)
        runs[mode] = train(model, pairs, [], TrainConfig(**cfg, prefix_sharing=mode), pad_id=0)
    assert runs["on"].prefix_sharing == "packed" and len(seen) == 8
    assert all(len(set(groups)) == 1 for groups in seen), seen  # whole conversations, one per micro-batch
    assert all(t == 30 + 5 + 6 + 7 + 2 * 3 + 3 for t in tokens)  # the opening once, each turn once
    on, off = ([h["loss"] for h in runs[m].history] for m in ("on", "off"))
    assert torch.allclose(torch.tensor(on), torch.tensor(off), atol=1e-4), (on, off)
