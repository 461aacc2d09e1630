"""Prefix-shared reward scoring gives the rewards of full-sequence scoring (`sequence_scores`), within
1e-4 in fp32, on real decoder reward models, by both kernels (the prefix's KV cache, and one packed row
per group under a block mask): the tiny Llama for every edge case, a small Mistral with a sliding
window, SmolLM2-135M for pairs and Best-of-8 groups; encoders are refused."""

import random

import pytest
import torch

from music_assets.common.sequences import common_prefix_length
from music_assets.evaluation.prefix_scoring import (packed_prefix_scores, shared_prefix_scores, split_shared_prefix,
                                                    supports_prefix_sharing)
from music_assets.training.prefix_attention import RowLayout
from music_assets.training.prefix_packing import pack_groups, tree_length, tree_row
from music_assets.training.rm_data import PairEncoder
from music_assets.training.train_rm import load_backbone
from music_assets.training.trainer import CPU_BATCH_TOKENS, length_batches, sequence_scores

TOLERANCE = 1e-4


def _head_with_spread(model):
    """A random score head with rewards of order 1 (the fresh head gives ~0.1), so that a reward read
    at the wrong token or position shows far above the tolerance."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.nn.init.normal_(model.score.weight, std=0.3)
    return model


@pytest.fixture(scope="module")
def tiny():
    model, tok = load_backbone("builtin:tiny-llama", 0)
    return _head_with_spread(model), tok


@pytest.fixture(params=["sdpa", "eager"])
def tiny_attention(tiny, request):
    """The tiny Llama under each attention implementation the packed kernel takes, put back after."""
    model, tok = tiny
    model.config._attn_implementation = request.param
    yield model, tok
    model.config._attn_implementation = "sdpa"


def _tokens(rng: random.Random, n: int, pad_id: int, vocab: int) -> list[int]:
    return [rng.choice([t for t in range(3, vocab) if t != pad_id]) for _ in range(n)]


def _token_source(tok, seed: int):
    """n -> n random real token ids of the tiny Llama's vocabulary (never the pad id), seeded."""
    rng = random.Random(seed)
    return lambda n: _tokens(rng, n, tok.pad_token_id, len(tok))


def _assert_matches_full_scoring(model, groups, pad_id, scores=shared_prefix_scores, **kw):
    shared = scores(model, groups, pad_id, **kw)
    full = sequence_scores(model, [s for g in groups for s in g], pad_id)
    assert [len(g) for g in shared] == [len(g) for g in groups]
    diff = max(abs(a - b) for a, b in zip([v for g in shared for v in g], full))
    assert diff <= TOLERANCE, f"largest difference from full-sequence scoring {diff:.2e}"
    return shared


def test_split_shared_prefix():
    assert split_shared_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2]]) == ([1, 2], [[3, 4], [5], []])
    assert split_shared_prefix([[1, 2], [1, 2]]) == ([1, 2], [[], []])
    assert split_shared_prefix([[1, 2], [3]]) == ([], [[1, 2], [3]])
    assert split_shared_prefix([[4, 5, 6]]) == ([4, 5, 6], [[]])


def test_edge_cases_match_full_sequence_scoring(tiny_attention):
    model, tok = tiny_attention
    t = _token_source(tok, 0)
    long, short = t(40), t(6)
    groups = [
        [long + t(5), long + t(17), long, long + t(1)],  # lengths differ; an empty and a one-token suffix
        [short + t(2), short + t(9)],  # a short prefix in the same batch as a long one
        [short[:1] + t(3), short[:1] + t(1)],  # a one-token prefix
        [[7] + t(4), [8] + t(6)],  # nothing shared
        [long[:10] + t(3), long[:10] + t(3), long[:10] + t(3), long[:10] + t(3)],  # Best-of-4
        [short, short],  # identical: both rewards at the prefix's last token
        [t(1)],
    ]
    one_batch = _assert_matches_full_scoring(model, groups, tok.pad_token_id, max_batch_tokens=10**6)
    per_group = _assert_matches_full_scoring(model, groups, tok.pad_token_id, max_batch_tokens=1)
    assert max(abs(a - b) for x, y in zip(one_batch, per_group) for a, b in zip(x, y)) <= TOLERANCE
    calls = []
    hook = model.model.register_forward_hook(lambda *a: calls.append(1))
    shared_prefix_scores(model, groups, tok.pad_token_id, max_batch_tokens=10**6)
    hook.remove()
    assert len(calls) == 3  # all shared prefixes, then all their suffixes; the groups sharing nothing


def test_pack_groups_lays_out_k_suffixes_after_one_prefix():
    """A group of three (one suffix empty) and a pair in one batch: the prefix once, each suffix's
    positions restarting after it, rewards at each suffix's end (the prefix's end for the empty one),
    suffixes blind to each other, the shorter row padded and isolated."""
    rows = pack_groups([[[1, 2, 3, 4], [1, 2, 5], [1, 2]], [[7, 8], [7, 9, 9]]], pad_id=0)
    assert rows.input_ids.tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 9, 0]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 3, 2], [0, 1, 1, 2, 0]]
    assert rows.reward_index.tolist() == [[3, 4, 1], [1, 3, -1]]
    assert rows.prefix_lengths == [2, 1] and rows.real_tokens == 9
    mask = rows.attention_mask[:, 0].int().tolist()
    assert mask[0][4] == [1, 1, 0, 0, 1]  # the second suffix sees the prefix and itself, not the first suffix
    assert mask[1][3] == [1, 0, 1, 1, 0] and mask[1][4] == [0, 0, 0, 0, 1]  # padding sees only itself


def test_a_group_packs_as_the_radix_tree_of_its_sequences():
    """Every run of tokens that several sequences share is one segment under the one they share before
    it, depth first; each sequence is read at its last token (a sequence that is a prefix of another
    at the end of the segment it ends in); positions run on from the ancestors; a token sees its
    ancestors whole and its own segment causally, never a sibling branch."""
    seqs = [[1, 2, 3, 4], [1, 2, 3, 5], [1, 6], [1, 2], [1, 2, 3, 4]]
    row = tree_row(seqs)
    assert row.ids == [1, 2, 3, 4, 5, 6]
    assert row.layout == RowLayout(((0, 1, -1), (1, 2, 0), (2, 3, 1), (3, 4, 2), (4, 5, 2), (5, 6, 0)))
    assert row.positions == [0, 1, 2, 3, 3, 1]
    assert row.ends == [3, 4, 5, 1, 3]  # [1, 2] ends in segment (1, 2); a repeated sequence reads the same token
    assert tree_length(seqs) == 6 and tree_length([[7, 8], [9]]) == 3  # nothing shared: two roots
    assert tree_row([[7, 8], [9]]).layout == RowLayout(((0, 2, -1), (2, 3, -1)))
    mask = pack_groups([seqs], pad_id=0).attention_mask[0, 0].int().tolist()
    assert mask[4] == [1, 1, 1, 0, 1, 0]  # 5 sees 1, 2, 3 (ancestors) and itself, not its sibling 4
    assert mask[5] == [1, 0, 0, 0, 0, 1]  # 6 sees only the root
    with pytest.raises(ValueError, match="sequence 1 has no tokens"):
        tree_row([[1], []])
    # tree_length counts without building the tree (sorted neighbours' shared prefixes): the same count
    rng = random.Random(5)
    for _ in range(200):
        group = [[rng.randint(1, 3) for _ in range(rng.randint(1, 8))] for _ in range(rng.randint(1, 6))]
        assert tree_length(group) == len(tree_row(group).ids), group
    assert common_prefix_length([[1, 2, 3, 4], [9, 2, 3, 5]], start=1) == 2
    assert common_prefix_length([[1, 2], [1, 2, 3]], start=5) == 0


def test_groups_that_open_alike_share_a_row_and_score_as_whole_sequences(tiny_attention):
    """Pairs and a Best-of-4 group that open with the same tokens (to different depths: a nested
    branch, a shorter shared opening) are packed into one row, each common run encoded once; a group
    opening differently, or one that would push the row past its cap, gets a row of its own; the
    rewards are those of full-sequence scoring and of one row per group."""
    from music_assets.evaluation.prefix_scoring import MIN_SHARED_PREFIX_TOKENS, shared_rows

    model, tok = tiny_attention
    t = _token_source(tok, 11)
    context, first, other = t(30), t(5), t(9)
    groups = [
        [context + first + t(4), context + t(6)],  # 0: a seed-like pair
        [context + first + t(7) + t(3), context + first + t(2)],  # 1: a MUSIC-like pair, deeper in the same branch
        [context[:12] + t(5), context[:12] + t(8)],  # 2: shares the first 12 tokens
        [context + t(n) for n in (2, 5, 1, 3)],  # 3: Best-of-4 on the same context
        [other + t(3), other + t(4)],  # 4: opens otherwise
    ]
    assert other[0] != context[0] and MIN_SHARED_PREFIX_TOKENS <= 12
    assert sorted(map(sorted, shared_rows(groups, 10**6))) == [[0, 1, 2, 3], [4]]
    flat = [s for g in groups[:4] for s in g]
    assert tree_length(flat) < sum(tree_length(g) for g in groups[:4])  # the common opening once
    together = _assert_matches_full_scoring(model, groups, tok.pad_token_id, packed_prefix_scores,
                                            max_batch_tokens=1)
    seen = []
    hook = model.model.register_forward_hook(lambda m, args, out: seen.append(out.last_hidden_state.shape[1]))
    try:
        packed_prefix_scores(model, groups, tok.pad_token_id, max_batch_tokens=1)
    finally:
        hook.remove()
    assert sorted(seen) == sorted([tree_length(flat), tree_length(groups[4])])  # one row each, no padding
    apart = packed_prefix_scores(model, groups, tok.pad_token_id, share_across_groups=False)
    assert max(abs(a - b) for x, y in zip(together, apart) for a, b in zip(x, y)) <= TOLERANCE
    capped = shared_rows(groups, tree_length(flat) - 1)
    assert len(capped) > 2 and sorted(i for row in capped for i in row) == [0, 1, 2, 3, 4]


def test_packed_rows_match_full_sequence_scoring(tiny_attention):
    """Pairs and Best-of-8 groups as one packed row each: empty and one-token suffixes, a one-token
    prefix, nothing shared, padding to the batch's longest row; several groups per forward or one."""
    model, tok = tiny_attention
    t = _token_source(tok, 4)
    long, short = t(40), t(6)
    groups = [
        [long + t(n) for n in (3, 17, 1, 9, 12, 20, 6)] + [long],  # Best-of-8, one candidate is the prefix
        [short + t(2), short + t(9)],
        [short + t(1), short],  # a one-token and an empty suffix
        [long + t(300), long + t(290)],  # suffixes run in query blocks
        [short[:1] + t(3), short[:1] + t(1)],  # a one-token prefix
        [[7] + t(4), [8] + t(6)],  # nothing shared
        [long[:20] + t(3) for _ in range(8)],
        [t(1)],
    ]
    together = _assert_matches_full_scoring(model, groups, tok.pad_token_id, packed_prefix_scores,
                                            max_batch_tokens=10**6)
    calls = []
    hook = model.model.register_forward_hook(lambda *a: calls.append(1))
    packed_prefix_scores(model, groups, tok.pad_token_id, max_batch_tokens=10**6)
    hook.remove()
    assert len(calls) == 1  # every group in one forward
    alone = _assert_matches_full_scoring(model, groups, tok.pad_token_id, packed_prefix_scores, max_batch_tokens=1)
    assert max(abs(a - b) for x, y in zip(together, alone) for a, b in zip(x, y)) <= TOLERANCE


def test_reward_is_read_at_the_true_last_token_even_when_it_is_the_pad_id(tiny):
    """HF's classifier takes the last token that is not `pad_token_id`; a sequence ending with that id
    (SmolLM2 pads with `<|im_end|>`) is read at its true end here, as an unpadded forward reads it."""
    model, tok = tiny
    rng = random.Random(1)
    prefix = _tokens(rng, 12, tok.pad_token_id, len(tok))
    seqs = [prefix + [5, tok.pad_token_id], prefix + [6, 7, 8]]
    got = shared_prefix_scores(model, [seqs], tok.pad_token_id)[0]
    pad, model.config.pad_token_id = model.config.pad_token_id, None  # no padding search: the last token
    try:
        with torch.inference_mode():
            ends = [model(input_ids=torch.tensor([s])).logits[0, 0].item() for s in seqs]
    finally:
        model.config.pad_token_id = pad
    assert max(abs(a - b) for a, b in zip(got, ends)) <= TOLERANCE


@pytest.mark.parametrize("scores", [shared_prefix_scores, packed_prefix_scores])
def test_truncated_pairs_split_exactly(tiny, scores):
    """The caller truncates first (the pair encoder drops shared context from the left); the split of
    what is left is exact and scores as the whole truncated sequences do."""
    model, tok = tiny
    context = [{"role": "user", "content": f"turn {i} about a longer shared context"} for i in range(12)]
    answers = [("yes, gladly", "no"), ("a reply", "a different and much longer reply")]
    encode = lambda max_length, a, b: PairEncoder(tok, max_length).encode(  # noqa: E731
        context + [{"role": "assistant", "content": a}], context + [{"role": "assistant", "content": b}])
    groups = [[p.chosen, p.rejected] for p in (encode(64, a, b) for a, b in answers)]
    whole = [encode(10_000, a, b) for a, b in answers]
    for seqs, untruncated in zip(groups, whole):
        prefix, suffixes = split_shared_prefix(seqs)
        assert max(len(s) for s in seqs) <= 64 < untruncated.length and prefix
        assert [prefix + s for s in suffixes] == seqs
    _assert_matches_full_scoring(model, groups, tok.pad_token_id, scores)


def _mistral_with_window(vocab: int = 200):
    """A small Mistral reward model with an 8-token sliding window (seeded)."""
    from transformers import MistralConfig, MistralForSequenceClassification

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, sliding_window=8, num_labels=1, pad_token_id=0)
    return _head_with_spread(MistralForSequenceClassification(config))


def test_sliding_window_model_matches_full_scoring():
    """Mistral with an 8-token window: groups longer than the window are scored alone, because
    padding inside a batch would push real tokens out of the window (mixing them errs by ~1)."""
    model = _mistral_with_window()
    rng = random.Random(1)
    t = lambda n: _tokens(rng, n, 0, 100)  # noqa: E731
    long, short = t(15), t(3)
    _assert_matches_full_scoring(model, [[long + t(5), long + t(12), long], [short + t(2), short + t(9)],
                                         [short[:2] + t(3), short[:2] + t(4)]], 0, max_batch_tokens=10**6)


def test_encoders_are_refused_and_bad_input_is_named(tiny):
    encoder, _ = load_backbone("builtin:minilm", 0)
    assert supports_prefix_sharing(tiny[0]) and not supports_prefix_sharing(encoder)
    with pytest.raises(ValueError, match="BertForSequenceClassification cannot share prefixes"):
        shared_prefix_scores(encoder, [[[1, 2], [1, 3]]], 0)
    with pytest.raises(ValueError, match="group 1, sequence 0: empty token sequence"):
        shared_prefix_scores(tiny[0], [[[5, 6]], [[], [5]]], 0)
    with pytest.raises(ValueError, match="group 0: no sequences"):
        shared_prefix_scores(tiny[0], [[]], 0)


def test_smollm2_pairs_and_best_of_eight_by_both_kernels():
    model, tok = load_backbone("builtin:smollm2", 0)
    render = lambda msgs: tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]  # noqa: E731
    context = [{"role": "user", "content": "Plan a three-day trip to Lisbon for a family with two kids."},
               {"role": "assistant", "content": "Day one: Belem and the tower; day two: the aquarium."},
               {"role": "user", "content": "We don't like museums. Change day one."}]
    answers = ["Then spend day one at the beach in Cascais.", "Day one: the Gulbenkian museum.",
               "Try the Sintra palaces and gardens instead.", "Ok.", "Sure.", "Day one: a tram ride and Alfama.",
               "How about the zoo?", "Keep day one, skip the tower."]
    best_of_8 = [render(context + [{"role": "assistant", "content": a}]) for a in answers]
    pairs = [best_of_8[:2], best_of_8[3:5]]
    assert len(split_shared_prefix(best_of_8)[0]) > 60
    for scores in (shared_prefix_scores, packed_prefix_scores):
        _assert_matches_full_scoring(model, [*pairs, best_of_8], tok.pad_token_id, scores)


def test_grouped_scores_takes_the_shared_path_only_where_it_pays(tiny):
    """`grouped_scores` (what rm_evaluation and best_of_n call): decoder groups with a long common
    prefix run it once (packed rows where the model takes a dense mask, else the KV cache), short
    prefixes, single sequences and encoders run whole; the rewards are the same either way, and the
    paths are counted per sequence."""
    from music_assets.evaluation.prefix_scoring import (MIN_CACHED_PREFIX_TOKENS, MIN_SHARED_PREFIX_TOKENS,
                                                        grouped_scores)

    model, tok = tiny
    rng = random.Random(3)
    long_prefix = _tokens(rng, MIN_CACHED_PREFIX_TOKENS + 10, tok.pad_token_id, 200)
    short_prefix = _tokens(rng, MIN_SHARED_PREFIX_TOKENS - 4, tok.pad_token_id, 200)
    groups = [[long_prefix + _tokens(rng, n, tok.pad_token_id, 200) for n in (3, 7, 1)],
              [short_prefix + _tokens(rng, n, tok.pad_token_id, 200) for n in (4, 5)],
              [_tokens(rng, 12, tok.pad_token_id, 200)]]
    full = sequence_scores(model, [s for g in groups for s in g], tok.pad_token_id)
    scores, paths = grouped_scores(model, groups, tok.pad_token_id)
    assert paths == {"prefix_packed": 3, "full": 3}
    assert max(abs(a - b) for a, b in zip([v for g in scores for v in g], full)) <= TOLERANCE
    windowed = _mistral_with_window()  # a sliding window cannot be packed: the KV-cache kernel
    middle = long_prefix[: (MIN_SHARED_PREFIX_TOKENS + MIN_CACHED_PREFIX_TOKENS) // 2]  # enough to pack, not to cache
    groups = [[long_prefix + [5], long_prefix + [6, 7]], [middle + [5], middle + [6]], [[3, 4, 5]]]
    scores, paths = grouped_scores(windowed, groups, 0)
    assert paths == {"prefix_cached": 2, "full": 3}
    full = sequence_scores(windowed, [s for g in groups for s in g], 0)
    assert max(abs(a - b) for a, b in zip([v for g in scores for v in g], full)) <= TOLERANCE
    encoder, enc_tok = load_backbone("builtin:minilm", 0)
    enc_groups = [[[101, 7592, 2088, 102], [101, 7592, 2088, 2017, 102]]]
    enc_scores, enc_paths = grouped_scores(encoder, enc_groups, enc_tok.pad_token_id)
    assert enc_paths == {"full": 2}
    assert enc_scores == [sequence_scores(encoder, enc_groups[0], enc_tok.pad_token_id)]


def test_scoring_batches_hold_at_most_the_cpu_token_budget(tiny):
    """Both scoring paths cut length-sorted batches by token slots (rows x the batch's longest), not
    by a count of sequences: on a CPU a batch of long conversations is slower than several small ones
    (the budget's measurements are at `trainer.CPU_BATCH_TOKENS`)."""
    costs = [5, 300, 40, 600, 1200, 250, 260]
    assert length_batches(costs, 1024) == [[0, 2, 5], [6, 1], [3], [4]]  # 1,200 > budget: alone
    model, tok = tiny
    t = _token_source(tok, 7)
    calls = []
    hook = model.model.register_forward_hook(lambda m, args, out: calls.append(out.last_hidden_state.shape[:2]))
    try:
        sequence_scores(model, [t(300) for _ in range(6)], tok.pad_token_id)
        assert [tuple(s) for s in calls] == [(3, 300), (3, 300)] and CPU_BATCH_TOKENS == 1024
        calls.clear()
        sequence_scores(model, [t(300) for _ in range(6)], tok.pad_token_id, batch_size=4)  # an explicit count
        assert [s[0] for s in calls] == [4, 2]
        calls.clear()
        pairs = [[prefix + t(50), prefix + t(60)] for prefix in (t(200) for _ in range(4))]  # opening unlike
        packed_prefix_scores(model, pairs, tok.pad_token_id)
        assert [tuple(s) for s in calls] == [(3, 310), (1, 310)]  # rows of 310 tokens: 3 fit in 1,024
    finally:
        hook.remove()


def test_packed_rows_run_their_mlps_in_chunks_on_a_cpu(tiny, monkeypatch):
    """On a CPU every layer's MLP takes a long packed row `CPU_MLP_CHUNK_TOKENS` tokens at a time
    (rows x positions, so also when several rows share a forward), the rewards stay those of
    full-sequence scoring, and the MLPs' own forward is back afterwards, also after a failure."""
    from music_assets.evaluation import prefix_scoring
    from music_assets.training.prefix_packing import chunked_mlps

    model, tok = tiny
    t = _token_source(tok, 9)
    mlps = [layer.mlp for layer in model.model.layers]
    pieces = []
    hook = mlps[0].gate_proj.register_forward_hook(lambda m, args, out: pieces.append(tuple(args[0].shape[:2])))
    try:
        long = t(600)
        _assert_matches_full_scoring(model, [[long + t(40), long + t(3)]], tok.pad_token_id, packed_prefix_scores)
        assert pieces == [(1, 512), (1, 131), (1, 603), (1, 640)]  # one row of 643 tokens; full scoring unchunked
        pieces.clear()
        monkeypatch.setattr(prefix_scoring, "CPU_MLP_CHUNK_TOKENS", 7)
        groups = [[p + t(5), p + t(9), p + t(1)] for p in (t(20), t(21))]  # two rows of 35 and 36 tokens
        _assert_matches_full_scoring(model, groups, tok.pad_token_id, packed_prefix_scores, max_batch_tokens=10**6)
        # 2 rows x 36 positions in 12 pieces of 3 positions (6 tokens); then the 6 sequences whole
        assert pieces == [(2, 3)] * 12 + [(6, 30)]
    finally:
        hook.remove()
    assert not any("forward" in vars(mlp) for mlp in mlps)
    with pytest.raises(RuntimeError, match="boom"), chunked_mlps(model, 4):
        assert all("forward" in vars(mlp) for mlp in mlps)
        raise RuntimeError("boom")
    assert not any("forward" in vars(mlp) for mlp in mlps)
