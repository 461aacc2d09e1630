"""Prefix-shared pair packing: a micro-batch packed as one row (the radix tree of all its sides; for
one pair `[prefix | chosen suffix | rejected suffix]`), or one row per pair, gives the same
Bradley-Terry loss and the same gradient of every parameter as encoding both sides in full (the
trainer's `rewards`), in fp32 to 1e-4: on the tiny Llama (SDPA and eager), SmolLM2-135M, tiny random
Mistral / Qwen2 / Qwen3, and under DDP on 2 processes (gloo). Edge cases: an empty chosen or rejected
suffix, one-token suffixes, suffixes of different lengths, no shared prefix, suffixes long enough for
the kernel's query blocks, and a batch mixing them (whose pairs share their prompt across pairs)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from music_assets.training.prefix_packing import (
    _allowed,
    pack_groups,
    pack_pairs,
    packed_forward,
    packed_pair_rewards,
    packing_refusal,
    pair_prefix_length,
    supports_prefix_packing,
)
from music_assets.training.prefix_attention import (
    NAME,
    QUERY_BLOCK,
    RowLayout,
    kernel_for,
    layout_mask_mod,
    packed_attention,
    prefix_shared_attention,
)
from music_assets.training.rm_data import EncodedPair
from music_assets.training.train_rm import load_backbone
from music_assets.training.trainer import TrainConfig, bt_loss, rewards, sequence_scores
from tests.helpers import REPO

TOLERANCE = 1e-4
CASES = ("different lengths", "empty chosen suffix", "empty rejected suffix", "one-token suffixes", "no shared prefix",
         "long suffixes")


def edge_pairs(tok) -> dict[str, tuple[list[int], list[int]]]:
    """One pair per edge case, from real chat text in `tok`'s own tokens (no side ends in the pad
    token, where the model's own pooling would read another token)."""
    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    prompt = ids("<|im_start|>user\nCan you suggest a good book to read this week?<|im_end|>\n<|im_start|>assistant\n")
    long_reply = ids("Sure, I recommend the history of Rome, step by step.<|im_end|>\n")
    short_reply = ids("No.<|im_end|>\n")
    one, other = ids("Yes")[:1], ids("Hmm")[:1]
    assert long_reply[0] != short_reply[0] and one != other and len(long_reply) * 20 > 2 * QUERY_BLOCK
    return {"different lengths": (prompt + long_reply, prompt + short_reply),
            "empty chosen suffix": (prompt, prompt + long_reply),
            "empty rejected suffix": (prompt + short_reply, prompt),
            "one-token suffixes": (prompt + one, prompt + other),
            "no shared prefix": (long_reply, short_reply),
            # suffixes of more than 2 x QUERY_BLOCK tokens: the kernel runs their queries in blocks
            "long suffixes": (prompt + long_reply * 25, prompt + short_reply + long_reply * 20)}


def batch_of(tok, case: str) -> list[tuple[list[int], list[int]]]:
    pairs = edge_pairs(tok)
    return list(pairs.values()) if case == "mixed" else [pairs[case]]


def loss_and_grads(model, loss: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def unpacked(model, pairs, pad_id):
    """The trainer's own forward (each side in full, right-padded, 2D attention mask) and BT loss."""
    return loss_and_grads(model, bt_loss(*rewards(model, [EncodedPair(*p) for p in pairs], pad_id), TrainConfig()))


def packed(model, pairs, pad_id):
    return loss_and_grads(model, bt_loss(*packed_pair_rewards(model, pack_pairs(pairs, pad_id)), TrainConfig()))


def assert_same_training_signal(model, pairs, pad_id) -> float:
    """Loss and every parameter's gradient, packed vs unpacked; returns the largest difference."""
    loss_u, grads_u = unpacked(model, pairs, pad_id)
    loss_p, grads_p = packed(model, pairs, pad_id)
    assert grads_u.keys() == grads_p.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    worst = max((grads_u[n] - grads_p[n]).abs().max().item() for n in grads_u)
    assert abs(loss_u - loss_p) < TOLERANCE, (loss_u, loss_p)
    assert worst < TOLERANCE, f"largest gradient difference {worst:.2e}"
    assert max(g.abs().max().item() for g in grads_u.values()) > 100 * TOLERANCE  # a real signal to compare
    return max(worst, abs(loss_u - loss_p))


def test_a_packed_row_holds_the_prefix_once_and_each_suffix_sees_only_the_prefix_and_itself():
    pad = 0
    batch = pack_pairs([([5, 6, 7, 8], [5, 6, 9]), ([3, 4], [3])], pad, one_row=False)
    assert pair_prefix_length([5, 6, 7, 8], [5, 6, 9]) == 2 and pair_prefix_length([1], [2]) == 0
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [3, 4, pad, pad, pad]]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 2]  # the rejected suffix restarts after the prefix
    assert batch.row.tolist() == [0, 1]
    assert batch.chosen_index.tolist() == [3, 1] and batch.rejected_index.tolist() == [4, 0]  # empty: prefix end
    assert batch.prefix_lengths == [2, 1] and batch.real_tokens == 7
    assert batch.layout == [RowLayout(((0, 2, -1), (2, 4, 0), (4, 5, 0))),  # the kernel's blocks: a root, two
                            RowLayout(((0, 1, -1), (1, 2, 0)))]  # children; an empty side reads its parent
    mask = batch.attention_mask
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0, 0],
                                         [1, 1, 0, 0, 0],
                                         [1, 1, 1, 0, 0],
                                         [1, 1, 1, 1, 0],
                                         [1, 1, 0, 0, 1]]  # rejected: prefix and itself, never chosen
    assert mask[1, 0].int().tolist() == [[1, 0, 0, 0, 0],
                                         [1, 1, 0, 0, 0],
                                         [0, 0, 1, 0, 0],  # padding sees only itself; no real token sees it
                                         [0, 0, 0, 1, 0],
                                         [0, 0, 0, 0, 1]]
    with pytest.raises(ValueError, match="pair 1: the rejected side has no tokens"):
        pack_pairs([([1], [2]), ([1], [])], pad)


def test_training_packs_a_micro_batch_as_one_row_reading_what_its_pairs_share_once():
    """The default (training's) layout: every side of the micro-batch in one row, the radix tree of
    them all, so there is no padding, and two pairs that open alike (a seed pair and the MUSIC pair
    simulated from its conversation) read their common opening once; pairs that share nothing are
    separate roots of the same row."""
    seed_pair = ([1, 2, 3, 4, 5], [1, 2, 3, 4, 6])
    music_pair = ([1, 2, 3, 7, 8], [1, 2, 3, 7, 9, 9])
    other = ([5, 5], [5, 6])
    batch = pack_pairs([seed_pair, music_pair, other], 0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 5, 5, 6]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 4, 3, 4, 4, 5, 0, 1, 1]]
    assert batch.real_tokens == 13 < sum(len(s) for pair in (seed_pair, music_pair, other) for s in pair)  # 25
    assert batch.layout == [RowLayout(((0, 3, -1), (3, 4, 0), (4, 5, 1), (5, 6, 1), (6, 7, 0), (7, 8, 4),
                                       (8, 10, 4), (10, 11, -1), (11, 12, 7), (12, 13, 7)))]
    assert batch.row.tolist() == [0, 0, 0]
    assert batch.chosen_index.tolist() == [4, 7, 11] and batch.rejected_index.tolist() == [5, 9, 12]
    mask = batch.attention_mask[0, 0]
    # the MUSIC pair's rejected suffix reads the shared opening and its own branch, never the seed pair's
    assert mask[9].int().tolist() == [1, 1, 1, 0, 0, 0, 1, 0, 1, 1, 0, 0, 0]
    assert mask[12].int().tolist() == [0] * 10 + [1, 0, 1]  # another conversation: nothing of the others


@pytest.fixture(scope="module")
def tiny_sdpa():
    return load_backbone("builtin:tiny-llama", 0, "sdpa")


@pytest.mark.slow
@pytest.mark.parametrize("case", [*CASES, "mixed"])
def test_tiny_llama_packed_loss_and_gradients_equal_unpacked(tiny_sdpa, case):
    model, tok = tiny_sdpa
    assert supports_prefix_packing(model)
    assert_same_training_signal(model, batch_of(tok, case), tok.pad_token_id)


@pytest.mark.slow
def test_packed_forward_runs_the_block_kernel_and_puts_the_attention_back(tiny_sdpa):
    """Every layer attends through `prefix_attention` with the rows' layouts; the configured
    implementation is back afterwards, also when the forward fails (a layout that does not fit)."""
    from transformers import AttentionInterface

    model, tok = tiny_sdpa
    batch, seen = pack_pairs(batch_of(tok, "mixed"), tok.pad_token_id), []

    def spy(*args, **kwargs):
        seen.append(kwargs["packed_layout"])
        return prefix_shared_attention(*args, **kwargs)

    AttentionInterface.register(NAME, spy)
    try:
        with torch.no_grad():
            packed_pair_rewards(model, batch)
    finally:
        AttentionInterface.register(NAME, prefix_shared_attention)
    assert seen == [batch.layout] * model.config.num_hidden_layers
    assert model.config._attn_implementation == "sdpa"
    rows = pack_pairs(batch_of(tok, "mixed"), tok.pad_token_id, one_row=False)
    with pytest.raises(ValueError, match="needs one RowLayout per row as `packed_layout` \\(got 1 for 6 rows\\)"):
        packed_pair_rewards(model, replace(rows, layout=rows.layout[:1]))
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.slow
def test_the_block_kernel_runs_pytorchs_fused_cpu_attention_forward_and_backward(tiny_sdpa):
    """On a CPU, SDPA takes its flash kernel only for 4-D inputs; given 3-D slices it falls back to
    the math kernel, which materialises every score and ran the packed rows 2-4.5x slower (that is
    how MUSIC pairs once scored no faster packed than whole). No timing here: the profiler says
    which kernel ran."""
    from torch.profiler import profile

    model, tok = tiny_sdpa
    batch = pack_pairs(batch_of(tok, "mixed"), tok.pad_token_id)
    with profile() as prof:
        chosen, rejected = packed_pair_rewards(model, batch)
        (chosen - rejected).sum().backward()
    model.zero_grad(set_to_none=True)
    ran = {e.key for e in prof.key_averages()}
    assert {"aten::_scaled_dot_product_flash_attention_for_cpu",
            "aten::_scaled_dot_product_flash_attention_for_cpu_backward"} <= ran
    assert "aten::_scaled_dot_product_attention_math" not in ran


def test_on_cuda_packed_rows_attend_through_flexattention_under_the_same_rule():
    """The GPU form's rule (`layout_mask_mod`, evaluated densely by FlexAttention's own `create_mask`)
    is the layout's: every real query sees what the dense `_allowed` mask lets it see and nothing
    else, padding included, for pairs (empty and one-token sides, no shared prefix) and for radix
    trees three levels deep. CUDA picks it; CPUs, and training with attention dropout, keep the
    blocks kernel."""
    from torch.nn.attention.flex_attention import create_mask
    from transformers import LlamaConfig

    pairs = pack_pairs([([5, 6, 7, 8], [5, 6, 9]), ([3, 4], [3]), ([1], [2]), ([4, 4, 4], [4, 4, 4, 4])], 0)
    trees = pack_groups([[[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 6], [1, 2, 6, 7, 8], [9]], [[1, 2], [1, 3]]], 0)
    for rows in (pairs, trees):
        width = rows.input_ids.shape[1]
        dense = create_mask(layout_mask_mod(rows.layout, width), len(rows.layout), None, width, width, device="cpu")
        allowed = _allowed(rows.layout, width)
        for b, row in enumerate(rows.layout):
            real = row.end
            assert torch.equal(dense[b, 0, :real], allowed[b, 0, :real]), (b, row)
            assert not dense[b, 0, :real, real:].any() and dense[b, 0, real:, real:].diagonal().all()
    assert trees.layout[0].segments == ((0, 2, -1), (2, 3, 0), (3, 4, 1), (4, 5, 1), (5, 6, 0), (6, 8, 4),
                                        (8, 9, -1))
    config = LlamaConfig(attention_dropout=0.1)
    assert kernel_for(torch.device("cuda", 0), config, training=False) == "flex"
    assert kernel_for(torch.device("cuda", 0), config, training=True) == "blocks"  # FlexAttention has no dropout
    assert kernel_for(torch.device("cuda", 0), LlamaConfig(), training=True) == "flex"
    assert kernel_for(torch.device("cpu"), LlamaConfig(), training=False) == "blocks"
    with pytest.raises(ValueError, match="kernel must be one of blocks, flex, got 'dense'"):
        with packed_attention(config, "dense"):
            pass


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_flexattention_scores_packed_rows_as_the_blocks_kernel_and_whole_sequences_do(tiny_sdpa, monkeypatch,
                                                                                     model_type):
    """The CUDA kernel's forward, here on the CPU: pairs (every edge case) and Best-of-N trees in one
    packed batch give, at every real token, the blocks kernel's hidden states, and at each sequence's
    last token the reward of the sequence scored whole. Transformers' FlexAttention implementation
    runs with PyTorch's eager `flex_attention` in place of its `torch.compile`d one (the compiled
    kernel is Triton's on a GPU; compiling the CPU one takes 20-40 s and a C++ toolchain, and its
    recompile for a second shape fails in this PyTorch), so this checks what the GPU computes: the
    block mask from the layouts, through transformers' code. The backward, which PyTorch's
    FlexAttention has only on GPUs, is compared with unpacked training by scripts/gpu_check.py on the
    device."""
    from torch.nn.attention.flex_attention import flex_attention
    from transformers.integrations import flex_attention as transformers_flex

    monkeypatch.setattr(transformers_flex, "compile_friendly_flex_attention",
                        lambda query, key, value, training=False, **kwargs: flex_attention(query, key, value, **kwargs))
    model, tok = tiny_sdpa
    if model_type != "llama":  # the other packable types, tiny and random (GQA: 4 query heads on 2 key heads)
        model = tiny_random(model_type, tok).eval()
    pairs = batch_of(tok, "mixed")
    prompt, (long_chosen, _), (one, other) = pairs[0][0][:20], pairs[-1], pairs[3]
    groups = [list(pair) for pair in pairs] + [
        [prompt + one, prompt + other, one + prompt, prompt + other[:-1] + one],
        [long_chosen, long_chosen[:300], long_chosen[:300] + one]]
    rows = pack_groups(groups, tok.pad_token_id)
    with torch.no_grad():
        hidden = {k: packed_forward(model.model, rows, k).last_hidden_state for k in ("blocks", "flex")}
        assert model.config._attn_implementation == "sdpa"
        whole = sequence_scores(model, [seq for group in groups for seq in group], tok.pad_token_id)
        packed = model.score(hidden["flex"]).squeeze(-1)
    for b, row in enumerate(rows.layout):
        difference = (hidden["blocks"][b, : row.end] - hidden["flex"][b, : row.end]).abs().max().item()
        assert difference < TOLERANCE, (b, difference)
    got = [packed[b, i].item() for b, group in enumerate(groups) for i in rows.reward_index[b, : len(group)]]
    assert max(abs(g - w) for g, w in zip(got, whole)) < TOLERANCE


@pytest.mark.slow
def test_eager_models_pack_the_same_keep_their_attention_and_padding_changes_nothing():
    model, tok = load_backbone("builtin:tiny-llama", 0, "eager")
    assert model.config._attn_implementation == "eager"
    assert_same_training_signal(model, batch_of(tok, "mixed"), tok.pad_token_id)
    assert model.config._attn_implementation == "eager"
    # a pair alone, in a batch padded to a longer row, and in one row with the others: the same rewards
    pairs = batch_of(tok, "mixed")
    with torch.no_grad():
        alone = torch.cat([torch.stack(packed_pair_rewards(model, pack_pairs([p], tok.pad_token_id)), 1)
                           for p in pairs])
        for one_row in (False, True):
            together = torch.stack(packed_pair_rewards(model, pack_pairs(pairs, tok.pad_token_id, one_row)), 1)
            assert (together - alone).abs().max().item() < 1e-5, one_row


@pytest.mark.slow
def test_smollm2_packed_loss_and_gradients_equal_unpacked():
    model, tok = load_backbone("builtin:smollm2", 0)
    assert model.config.model_type == "llama" and next(model.parameters()).dtype == torch.float32
    # the long-suffix case (the kernel's query blocks) runs on the tiny models; at SmolLM2's size it would
    # add most of a minute to the suite
    short = [pair for case, pair in edge_pairs(tok).items() if case != "long suffixes"]
    worst = assert_same_training_signal(model, short, tok.pad_token_id)
    print(f"SmolLM2-135M, mixed edge-case batch: largest loss/gradient difference {worst:.2e}")


def tiny_random(model_type: str, tok, sliding_window: int | None = None):
    """A tiny randomly initialised reward model of `model_type` (2 layers, hidden 64) for `tok`."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.for_model(model_type, vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  num_labels=1, pad_token_id=tok.pad_token_id, sliding_window=sliding_window)
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3"])
def test_other_llama_family_types_train_the_same_packed(tiny_sdpa, model_type):
    """The other packable types, as tiny random models (the tiny Llama's tokenizer): they share
    Llama's mask and RoPE code path, and this checks they really do."""
    _, tok = tiny_sdpa
    model = tiny_random(model_type, tok)
    assert supports_prefix_packing(model)
    assert_same_training_signal(model, batch_of(tok, "mixed"), tok.pad_token_id)


@pytest.mark.slow
def test_models_it_cannot_pack_are_refused_with_the_reason(tiny_sdpa):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    minilm, _ = load_backbone("builtin:minilm", 0)
    assert not supports_prefix_packing(minilm)
    assert "model type 'bert'" in packing_refusal(minilm)
    model, tok = tiny_sdpa
    folder = model.name_or_path
    assert "no `score` head" in packing_refusal(AutoModelForCausalLM.from_pretrained(folder))
    assert "sliding-window" in packing_refusal(tiny_random("mistral", tok, sliding_window=64))
    flex = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, attn_implementation="flex_attention")
    assert packing_refusal(flex) is None  # FlexAttention is what packed rows run on CUDA
    flash = tiny_random("llama", tok)
    flash.config._attn_implementation = "flash_attention_2"  # the user's choice on a GPU: left alone
    assert "in place of sdpa, eager or flex_attention only" in packing_refusal(flash)
    with pytest.raises(ValueError, match="prefix packing is not possible for this model: model type 'bert'"):
        packed_pair_rewards(minilm, pack_pairs(batch_of(tok, "mixed"), 0))


@pytest.mark.slow
def test_ddp_on_two_processes_gives_the_single_process_unpacked_gradients(tiny_sdpa, tmp_path):
    """torchrun, gloo: each rank packs half of the mixed batch and runs it through its DDP wrapper;
    after the backward (gradients averaged across ranks) both ranks hold the gradient of one process
    running the whole batch unpacked."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tests.training.test_prefix_packing", str(tmp_path)]
    log = tmp_path / "torchrun.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
        try:
            assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:  # the launcher and its ranks must not outlive the test
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    model, tok = tiny_sdpa
    loss, expected = unpacked(model, batch_of(tok, "mixed")[:4], tok.pad_token_id)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got.keys() == expected.keys()
        assert max((got[n] - expected[n]).abs().max().item() for n in expected) < TOLERANCE


def _ddp_rank(out: Path) -> None:
    """One rank of the DDP test: half of the first 4 mixed pairs, packed, one backward through DDP."""
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    torch.set_num_threads(1)
    model, tok = load_backbone("builtin:tiny-llama", 0, "sdpa")
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    mine = batch_of(tok, "mixed")[:4][2 * rank : 2 * rank + 2]
    bt_loss(*packed_pair_rewards(ddp, pack_pairs(mine, tok.pad_token_id)), TrainConfig()).backward()
    torch.save({n: p.grad for n, p in model.named_parameters()}, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _ddp_rank(Path(sys.argv[1]))
