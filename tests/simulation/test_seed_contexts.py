"""Which seed pairs become contexts (`max_contexts`: a seeded sample, not the first rows of the
file), and the rule music_pairs' blocking check holds each pair to (`min_differing_turns`)."""

import random

import pytest

from music_assets.common.hashing import stable_hash
from music_assets.simulation.config import SimulationConfig
from music_assets.simulation.contexts import choose_contexts
from music_assets.simulation.pairs import assemble_pairs, assistant_turns_differing


def seed_pairs(sub_sources=("alpaca", "sharegpt", "math"), per_source=30, start=0, short_every=7):
    """A Skywork-style file: ordered by sub-source; every `short_every`-th pair has no exchange."""
    pairs = []
    for s, sub in enumerate(sub_sources):
        for i in range(per_source):
            row = start + s * per_source + i
            exchanges = 0 if row % short_every == 0 else 1 + row % 3
            chosen = [{"role": "user", "content": f"{sub} q{row}"}]
            for e in range(exchanges):
                chosen += [{"role": "assistant", "content": f"a{row}.{e}"}, {"role": "user", "content": f"f{row}.{e}"}]
            pairs.append({"source": "skywork", "pair_id": f"{sub}/{row}", "row_number": row, "chosen": chosen})
    return pairs


def picks(pairs, n, seed=0, min_k=1):
    contexts, _ = choose_contexts(pairs, min_k, 3, seed, n)
    return [c["pair_id"] for c in contexts]


def test_max_contexts_is_a_seeded_sample_not_the_first_rows_of_the_file():
    pairs = seed_pairs()
    chosen = picks(pairs, 10)
    first_rows = [p["pair_id"] for p in pairs if p["row_number"] % 7][:10]
    assert len(chosen) == 10 and chosen != first_rows
    assert len({pid.split("/")[0] for pid in chosen}) > 1  # not all from the first sub-source
    assert picks(pairs, 10) == chosen  # seeded: the same again
    assert picks(pairs, 10, seed=1) != chosen
    # in row order, for a deterministic output
    rows = {p["pair_id"]: p["row_number"] for p in pairs}
    assert [rows[pid] for pid in chosen] == sorted(rows[pid] for pid in chosen)


def test_the_sample_does_not_depend_on_the_input_order():
    pairs = seed_pairs()
    shuffled = list(pairs)
    random.Random(3).shuffle(shuffled)
    assert choose_contexts(shuffled, 1, 3, 0, 10) == choose_contexts(pairs, 1, 3, 0, 10)


def test_a_grown_file_keeps_the_old_picks_that_still_rank_in_the_top_n():
    old = seed_pairs()
    grown = old + seed_pairs(("coding", "chat"), per_source=40, start=len(old))
    before, after = set(picks(old, 12)), set(picks(grown, 12))
    new_ids = {p["pair_id"] for p in grown} - {p["pair_id"] for p in old}
    assert after & new_ids and before & after  # some new pairs come in, but the sample is not reshuffled
    assert len(before - after) == len(after & new_ids)  # an old pick leaves only for a new one
    # each old pick that leaves is outranked by N grown pairs: all N picks rank below it
    rank = {p["pair_id"]: stable_hash([0, p["pair_id"]]) for p in grown}
    assert all(rank[gone] > max(rank[pid] for pid in after) for gone in before - after)


def test_too_short_pairs_are_skipped_and_counted_with_or_without_max_contexts():
    pairs = seed_pairs()
    short = sum(1 for p in pairs if p["row_number"] % 7 == 0)
    everything, skipped = choose_contexts(pairs, 1, 3, 0, None)
    assert skipped == short and len(everything) == len(pairs) - short
    sample, skipped = choose_contexts(pairs, 1, 3, 0, 5)
    assert skipped == short and len(sample) == 5
    assert all(c["k"] >= 1 for c in sample)  # never a too-short pair, even when it ranks first
    assert choose_contexts(pairs, 1, 3, 0, 10_000)[0] == everything
    # a sampled context is the one the full run would have made for that pair (same k, same id)
    by_pair = {c["pair_id"]: c for c in everything}
    assert all(by_pair[c["pair_id"]] == c for c in sample)


def pair_differing_in(turns: int, c: int, differing: int) -> dict:
    """A finished pair (T turns, contrast at c) whose rejected answers differ in `differing` turns from c."""
    context = {"context_id": "ctx", "source": "s", "pair_id": "p", "k": 1,
               "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    rows = []
    for t in range(1, turns + 1):
        for b in (("shared",) if t < c else ("chosen", "rejected")):
            same = b == "chosen" or t - c >= differing
            rows.append({"context_id": "ctx", "branch": b, "turn": t, "contrast_turn": c, "user_message": f"u{t}",
                         "assistant_message": f"a{t}" if same else f"flawed a{t}", "modified_instruction": "m",
                         "generation_key": "g", "prompt_version": "p", "models": "{}", "settings": "{}"})
    (pair,) = assemble_pairs([context], rows, turns)
    return pair


@pytest.mark.parametrize("settings, c, differing, passes", [
    # min_contrast_turns 1, c = T: one flawed turn is all there can be (min(2, T) failed the partition)
    (SimulationConfig(turns=3, min_contrast_turns=1), 3, 1, True),
    (SimulationConfig(turns=1, min_contrast_turns=1), 1, 1, True),
    (SimulationConfig(turns=3, min_contrast_turns=1), 2, 0, False),
    # the default (2): at least two flawed turns
    (SimulationConfig(turns=3), 2, 2, True),
    (SimulationConfig(turns=3), 1, 1, False),
    (SimulationConfig(turns=5, min_contrast_turns=3), 2, 3, True),
    (SimulationConfig(turns=5, min_contrast_turns=3), 1, 2, False),
])
def test_the_pairs_check_asks_for_min_contrast_turns_differing_turns(settings, c, differing, passes):
    pair = pair_differing_in(settings.turns, c, differing)
    assert assistant_turns_differing(pair) == differing
    assert (assistant_turns_differing(pair) >= settings.min_differing_turns()) is passes


def test_min_differing_turns_follows_the_settings():
    assert SimulationConfig().min_differing_turns() == 2
    assert SimulationConfig(turns=3, min_contrast_turns=1).min_differing_turns() == 1
    assert SimulationConfig(turns=5, min_contrast_turns=4).min_differing_turns() == 4
    # every c the settings allow leaves at least that many flawed turns
    for s in (SimulationConfig(turns=4, min_contrast_turns=m) for m in (1, 2, 3, 4)):
        assert all(s.turns - s.contrast_turn_for(f"c{i}") + 1 >= s.min_differing_turns() for i in range(50))
