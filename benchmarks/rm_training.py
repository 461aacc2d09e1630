"""Reward-model training speed: our trainer vs TRL's RewardTrainer, side by side in one run.

Same backbone, same pairs (HH-RLHF harmless slice, grouped split; only pairs whose both sides fit
`max_length` under the plain rendering, because TRL drops longer ones while we truncate), same
batch size, max length, steps, learning rate and schedule, dropout off in both. Each run is a
child process, which reports its peak RSS. Prints samples/s (pairs/s in the training loop, data
preparation excluded for both), peak RSS and held-out accuracy (both models scored by the same
code on the same test pairs), and the speed ratio (target >= 1.3x, accuracy within 1 point).

TRL is not a dependency of the project; install it for the benchmark only:

    .venv/bin/pip install --target .bench-libs --no-deps trl==1.16.0 datasets dill multiprocess xxhash pandas pytz tzdata
    .venv/bin/python benchmarks/rm_training.py [--backbones minilm smollm2] [--steps N] [--seed S]

`--seed` sets, for both trainers alike, the new head's initial weights and the data order: at a
few hundred test pairs one seed's accuracy gap is mostly noise, so compare over several seeds.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH_LIBS = REPO / ".bench-libs"
SETTINGS = {
    "minilm": {"backbone": "builtin:minilm", "chat_template": "plain", "max_length": 256, "batch_size": 8, "steps": 30},
    "smollm2": {"backbone": "builtin:smollm2", "chat_template": None, "max_length": 160, "batch_size": 8, "steps": 8},
}
LR = 5e-5
WARMUP = 0.05  # share of steps; both trainers round it to the same whole number of steps


def _data(setting: dict):
    """(train pairs, test pairs) as message lists that fit max_length untruncated."""
    from music_assets.seeds.ingest import ingest
    from music_assets.training.rm_data import PairEncoder
    from music_assets.curation.splits import assign_splits
    from music_assets.training.train_rm import load_backbone
    from music_assets.seeds.reader import ResolvedSource

    import polars as pl

    path = REPO / "tests" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    pairs = ingest(ResolvedSource("hh", str(path), "hh_rlhf", path=path)).pairs
    df = assign_splits(pl.DataFrame([{"group_id": p["context_hash"], "chosen": p["chosen"], "rejected": p["rejected"]}
                                     for p in pairs]), 0, 0.1, 0.1)
    _, tok = load_backbone(setting["backbone"], 0)
    enc = PairEncoder(tok, setting["max_length"], setting["chat_template"])
    room = setting["max_length"] - 2  # [CLS] and [SEP] for encoders

    def fits(p):
        return max(len(enc.render_ids(p["chosen"])), len(enc.render_ids(p["rejected"]))) <= room

    def split(s):
        return [p for p in df.filter(pl.col("split") == s).select("chosen", "rejected").to_dicts() if fits(p)]

    # neither trainer validates during the run, so both held-out splits measure accuracy (more pairs, less noise)
    return split("train"), split("validation") + split("test")


def _evaluate(model, tok, setting, test) -> float:
    from music_assets.training.rm_data import PairEncoder
    from music_assets.training.trainer import accuracy, pairwise_scores

    enc = PairEncoder(tok, setting["max_length"], setting["chat_template"])
    return accuracy(pairwise_scores(model, [enc.encode(p["chosen"], p["rejected"]) for p in test], tok.pad_token_id))


def child_ours(setting: dict) -> dict:
    from music_assets.training.rm_data import PairEncoder
    from music_assets.training.train_rm import load_backbone
    from music_assets.training.trainer import TrainConfig, train

    train_pairs, test = _data(setting)
    model, tok = load_backbone(setting["backbone"], setting["seed"])
    enc = PairEncoder(tok, setting["max_length"], setting["chat_template"])
    encoded = [enc.encode(p["chosen"], p["rejected"]) for p in train_pairs]
    cfg = TrainConfig(backbone=setting["backbone"], chat_template=setting["chat_template"], max_length=setting["max_length"],
                      batch_size=setting["batch_size"], micro_batch_size=setting["batch_size"], learning_rate=LR,
                      max_steps=setting["steps"], warmup_ratio=WARMUP, lr_scheduler="linear", eval_every=0,
                      log_every=10**9, precision="fp32", seed=setting["seed"])
    started = time.perf_counter()
    result = train(model, encoded, [], cfg, tok.pad_token_id)
    seconds = time.perf_counter() - started
    return {"trainer": "ours", "train_pairs": len(train_pairs), "test_pairs": len(test), "seconds": round(seconds, 1),
            "samples_per_s": round(result.samples_seen / seconds, 2), "accuracy": round(_evaluate(model, tok, setting, test), 4)}


def child_trl(setting: dict) -> dict:
    sys.path.insert(0, str(BENCH_LIBS))
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from music_assets.training.rm_data import PLAIN_TEMPLATE
    from music_assets.training.train_rm import load_backbone

    train_pairs, test = _data(setting)
    model, tok = load_backbone(setting["backbone"], setting["seed"])
    if setting["chat_template"] == "plain":
        tok.chat_template = PLAIN_TEMPLATE
    with tempfile.TemporaryDirectory() as out:
        args = RewardConfig(output_dir=out, per_device_train_batch_size=setting["batch_size"], gradient_accumulation_steps=1,
                            max_steps=setting["steps"], learning_rate=LR, warmup_steps=int(round(WARMUP * setting["steps"])),
                            lr_scheduler_type="linear",
                            max_length=setting["max_length"], logging_steps=10**6, save_strategy="no", eval_strategy="no",
                            report_to=[], use_cpu=True, bf16=False, seed=setting["seed"], data_seed=setting["seed"],
                            dataloader_num_workers=0, disable_dropout=True,
                            gradient_checkpointing=False)  # TRL's default is True; ours is False: compare like with like
        trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(train_pairs), processing_class=tok)
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    samples = setting["steps"] * setting["batch_size"]
    return {"trainer": "trl", "train_pairs": len(train_pairs), "test_pairs": len(test), "seconds": round(seconds, 1),
            "samples_per_s": round(samples / seconds, 2), "accuracy": round(_evaluate(model, tok, setting, test), 4)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbones", nargs="+", default=list(SETTINGS))
    parser.add_argument("--child")
    parser.add_argument("--backbone")
    parser.add_argument("--steps", type=int, help="override the backbone's step count (same for both trainers)")
    parser.add_argument("--seed", type=int, default=0, help="head initialization and data order, both trainers")
    args = parser.parse_args()
    for setting in SETTINGS.values():
        setting["seed"] = args.seed
        setting["steps"] = args.steps or setting["steps"]
    if args.child:
        out = {"ours": child_ours, "trl": child_trl}[args.child](SETTINGS[args.backbone])
        out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        print(json.dumps(out))
        return
    if not (BENCH_LIBS / "trl").is_dir():
        sys.exit(f"TRL is not installed for the benchmark: see the docstring of {__file__}")
    for backbone in args.backbones:
        results = {}
        for trainer in ("ours", "trl"):
            options = ["--steps", str(SETTINGS[backbone]["steps"]), "--seed", str(args.seed)]
            proc = subprocess.run([sys.executable, __file__, "--child", trainer, "--backbone", backbone, *options],
                                  capture_output=True, text=True, cwd=REPO)
            if proc.returncode:
                sys.exit(f"{trainer}/{backbone} failed:\n{proc.stderr[-3000:]}")
            results[trainer] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{backbone:8} seed {args.seed} {json.dumps(results[trainer])}", flush=True)
        ours, trl = results["ours"], results["trl"]
        print(f"{backbone:8} speed ours/TRL = {ours['samples_per_s'] / trl['samples_per_s']:.2f}x (target >= 1.3); "
              f"accuracy ours - TRL = {100 * (ours['accuracy'] - trl['accuracy']):+.1f} points (target >= -1)", flush=True)


if __name__ == "__main__":
    main()
