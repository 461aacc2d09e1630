"""Training strategies and precision on CPU (gloo): FSDP2 across 2 processes equals one process,
a run resumed from a sharded state equals an uninterrupted one, `select: best` ends on the best
validation weights kept on disk and `select: last` on the final ones, pure bf16 trains in bf16,
and a GPU asked for where there is none fails at once with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from music_assets.seeds.ingest import ingest
from music_assets.seeds.reader import ResolvedSource
from music_assets.training.rm_data import PairEncoder
from music_assets.training.train_rm import load_backbone, training_device
from music_assets.training.trainer import TrainConfig, accuracy, pairwise_scores, train
from tests.helpers import run_side_by_side

TINY = dict(backbone="builtin:tiny-llama", max_length=48, batch_size=8, micro_batch_size=2, learning_rate=1e-3,
            eval_every=0, log_every=1)


@pytest.fixture(scope="module")
def splits(tmp_path_factory, real_data) -> dict[str, str]:
    """96 HH-RLHF pairs: 64 to train on, 16 for validation, 16 for test. The tiny Llama is built first,
    as the reward_model asset resolves the backbone before it launches the ranks."""
    from music_assets.model_provisioning import resolve_model

    resolve_model(TINY["backbone"])
    out = tmp_path_factory.mktemp("pairs")
    path = real_data / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    rows = ingest(ResolvedSource("hh", str(path), "hh_rlhf", path=path)).pairs[:96]
    df = pl.DataFrame([{"pair_id": p["pair_id"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in rows])
    files = {"train": out / "train.parquet", "validation": out / "val.parquet", "test": out / "test.parquet"}
    df.head(64).write_parquet(files["train"])
    df.slice(64, 16).write_parquet(files["validation"])
    df.slice(80, 16).write_parquet(files["test"])
    return {k: str(v) for k, v in files.items()}


def _job(splits, out: Path, strategy: str = "ddp", **config) -> dict:
    return {"config": {**TINY, **config}, "data": splits, "output_dir": str(out), "strategy": strategy}


def _max_difference(a: Path, b: Path) -> float:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert x.keys() == y.keys()
    return max((x[k].float() - y[k].float()).abs().max().item() for k in x)


@pytest.mark.slow
def test_fsdp_on_two_processes_matches_one_process(splits, tmp_path):
    """torchrun, gloo: FSDP2 (a unit per decoder layer, then the root) over 2 ranks, each with half
    of every step's pairs, ends within 1e-5 of one process taking the same steps; the checkpoint is
    a standard Hugging Face folder gathered from the shards."""
    from transformers import AutoModelForSequenceClassification

    run_side_by_side({"single": (_job(splits, tmp_path / "single", max_steps=4, prefix_sharing="on"), 1),
                      "fsdp": (_job(splits, tmp_path / "fsdp", "fsdp", max_steps=4, prefix_sharing="on"), 2),
                      "unpacked": (_job(splits, tmp_path / "unpacked", max_steps=4, prefix_sharing="off"), 1)},
                     tmp_path)
    worst = _max_difference(tmp_path / "single", tmp_path / "fsdp")
    print(f"max |single - fsdp| weight difference: {worst:.2e}")
    assert worst < 1e-5
    # packed pairs (the shared prefix once), under FSDP too: the weights after 4 steps equal
    # training each side in full
    packed = _max_difference(tmp_path / "single", tmp_path / "unpacked")
    print(f"max |packed - unpacked| weight difference: {packed:.2e}")
    assert packed < 1e-4
    kinds = {name: json.loads((tmp_path / name / "music_metadata.json").read_text())["metrics"]
             for name in ("single", "fsdp", "unpacked")}
    assert [kinds[n]["prefix_sharing"] for n in ("single", "fsdp", "unpacked")] == ["packed", "packed", "off"]
    assert [kinds[n]["prefix_attention"] for n in ("single", "fsdp", "unpacked")] == ["blocks", "blocks", None]
    assert kinds["single"]["shared_prefix_fraction"] > 0
    meta = json.loads((tmp_path / "fsdp" / "music_metadata.json").read_text())
    assert meta["metrics"]["strategy"] == "fsdp" and meta["metrics"]["processes"] == 2
    assert meta["metrics"]["precision"] == meta["config"]["precision"]
    initial = load_backbone("builtin:tiny-llama", 0)[0].state_dict()
    trained = load_file(tmp_path / "fsdp" / "model.safetensors")
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "fsdp")  # loads as any HF checkpoint


@pytest.mark.slow
def test_fsdp_resumes_from_a_sharded_state_equal_to_an_uninterrupted_run(splits, tmp_path):
    config = dict(max_steps=8, checkpoint_every=3)
    state = tmp_path / "state"
    run_side_by_side({"whole": (_job(splits, tmp_path / "whole", "fsdp", **config), 2),
                      "cut": ({**_job(splits, tmp_path / "cut", "fsdp", **config), "state_dir": str(state),
                               "stop_after_steps": 5}, 2)}, tmp_path)
    assert not (tmp_path / "cut").exists()  # interrupted: no checkpoint
    assert [p.name for p in state.glob("shards-step-*")] == ["shards-step-3"]  # each rank's shards, by DCP
    run_side_by_side({"resumed": ({**_job(splits, tmp_path / "resumed", "fsdp", **config), "state_dir": str(state)},
                                  2)}, tmp_path)
    meta = json.loads((tmp_path / "resumed" / "music_metadata.json").read_text())
    assert meta["metrics"]["resumed_from_step"] == 3 and meta["metrics"]["steps"] == 8
    assert _max_difference(tmp_path / "whole", tmp_path / "resumed") < 1e-6
    # a replicated run cannot pick up a sharded state (and is told why)
    with pytest.raises(ValueError, match="FSDP"):
        model, tok, pairs = _pairs(splits)
        # (the job resolved precision "auto" to fp32 here: no bf16_supported in it)
        train(model, pairs, [], TrainConfig(**{**TINY, **config, "precision": "fp32"}), tok.pad_token_id, state_dir=state)


def _pairs(splits, split="train"):
    model, tok = load_backbone("builtin:tiny-llama", 0)
    enc = PairEncoder(tok, TINY["max_length"], None)
    return model, tok, [enc.encode(p["chosen"], p["rejected"], p["pair_id"]) for p in pl.read_parquet(splits[split]).to_dicts()]


@pytest.mark.slow
def test_select_best_ends_on_the_best_weights_kept_on_disk_and_last_on_the_final_ones(splits, tmp_path):
    config = {**TINY, "max_steps": 8, "eval_every": 1}
    model_best, tok, pairs = _pairs(splits)
    _, _, val = _pairs(splits, "validation")
    best = train(model_best, pairs, val, TrainConfig(**config, select="best"), tok.pad_token_id, state_dir=tmp_path)
    on_disk = torch.load(tmp_path / "best_weights.pt", weights_only=True)
    assert all(torch.equal(on_disk[k], v) for k, v in model_best.state_dict().items())
    assert accuracy(pairwise_scores(model_best, val, tok.pad_token_id)) == best.best_validation_accuracy

    def same_scores(kept, model):
        """The validation scores `train` hands back (so that train_rm does not score the returned weights
        again) are those of the weights it returned."""
        fresh = pairwise_scores(model, val, tok.pad_token_id)
        assert kept is not None and len(kept) == len(fresh) == len(val)
        assert max(abs(a - b) for k, f in zip(kept, fresh) for a, b in zip(k, f)) < 1e-5

    same_scores(best.final_validation_scores, model_best)
    model_last, _, _ = _pairs(splits)
    last = train(model_last, pairs, val, TrainConfig(**config), tok.pad_token_id)  # select: last, the default
    same_scores(last.final_validation_scores, model_last)
    model_plain, _, _ = _pairs(splits)
    plain = train(model_plain, pairs, [], TrainConfig(**config), tok.pad_token_id)  # no validation at all
    assert plain.final_validation_scores is None
    model_cut, _, _ = _pairs(splits)  # stopped at step 4, last scored at 3: nothing to hand back
    cut = train(model_cut, pairs, val, TrainConfig(**{**config, "eval_every": 3}), tok.pad_token_id, stop_after_steps=4)
    assert cut.steps == 4 and cut.final_validation_scores is None
    assert all(torch.equal(a, b) for a, b in zip(model_last.state_dict().values(), model_plain.state_dict().values()))
    passes = [h["validation_accuracy"] for h in last.history if "validation_accuracy" in h]
    assert last.best_validation_accuracy == max(passes) == best.best_validation_accuracy
    if passes.index(max(passes)) != len(passes) - 1:  # the best pass was not the last: the two must differ
        assert any(not torch.equal(a, b) for a, b in zip(model_best.state_dict().values(),
                                                         model_last.state_dict().values()))


@pytest.mark.slow
def test_pure_bf16_trains_with_bf16_weights_and_optimizer_state(splits):
    model, tok, pairs = _pairs(splits)
    result = train(model, pairs, [], TrainConfig(**{**TINY, "max_steps": 3, "precision": "bf16-pure"}), tok.pad_token_id)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)


def test_a_gpu_asked_for_where_there_is_none_fails_at_once_with_the_reason():
    from dagster import build_init_resource_context

    from resources.compute import ComputeResource

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="compute.device is 'cuda', but this machine has no CUDA device"):
        ComputeResource(device="cuda").setup_for_execution(build_init_resource_context())
    ComputeResource(device="cpu").setup_for_execution(build_init_resource_context())
    with pytest.raises(RuntimeError, match="torch sees no CUDA device"):
        training_device({"device": "cuda"})
    assert training_device({"device": "cpu"}) == (torch.device("cpu"), "gloo")


def test_prefix_sharing_auto_packs_where_the_model_allows_it_and_the_pairs_share_enough():
    from music_assets.training.rm_data import DataError, EncodedPair
    from music_assets.training.trainer import AUTO_MIN_SHARED_FRACTION, _pair_rewards_fn, packed_rewards, rewards

    model, _ = load_backbone("builtin:tiny-llama", 0)
    long_prefix = [EncodedPair(list(range(40)) + [1, 2], list(range(40)) + [3])]
    short_prefix = [EncodedPair([5, 1, 2, 3, 4], [6, 7, 8, 9])]  # nothing shared
    assert _pair_rewards_fn(model, long_prefix, TrainConfig(prefix_sharing="auto"))[:2] == (packed_rewards, "packed")
    fn, kind, fraction = _pair_rewards_fn(model, short_prefix, TrainConfig(prefix_sharing="auto"))
    assert (fn, kind) == (rewards, "off") and fraction < AUTO_MIN_SHARED_FRACTION
    assert _pair_rewards_fn(model, short_prefix, TrainConfig(prefix_sharing="on"))[1] == "packed"
    assert _pair_rewards_fn(model, long_prefix, TrainConfig(prefix_sharing="off"))[1] == "off"
    encoder, _ = load_backbone("builtin:minilm", 0)
    assert _pair_rewards_fn(encoder, long_prefix, TrainConfig(prefix_sharing="auto"))[1] == "off"
    with pytest.raises(DataError, match="prefix_sharing is on.*bert"):
        _pair_rewards_fn(encoder, long_prefix, TrainConfig(prefix_sharing="on"))
    with pytest.raises(ValueError, match="prefix_sharing"):
        TrainConfig(prefix_sharing="yes")
