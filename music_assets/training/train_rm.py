"""The reward-model training job: `python -m music_assets.training.train_rm JOB.json` (or under torchrun).

Launched by the `reward_model` asset through Dagster Pipes (`PipesSubprocessClient`), so its
progress logs and final metrics flow back into the materialization; it also runs by hand. The
job file names the data (TRL-format Parquet files of the train/validation/test splits), the
training config, the output folder and the resumable-state folder. Rank 0 writes a Hugging Face
folder (safetensors) that `AutoModelForSequenceClassification.from_pretrained` loads.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

METADATA_FILE = "music_metadata.json"
CURVE_FILE = "training_curve.png"
_DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout", "dropout",
                   "classifier_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop")


def resolve_backbone(name: str) -> str:
    """A local folder for `name`, or a clear error: builtin models are built/found locally, a
    path must exist, and a hub id only works when the hub is reachable."""
    from music_assets.model_provisioning import resolve_model

    path = resolve_model(name)
    if Path(path).expanduser().is_dir():
        return str(Path(path).expanduser())
    if path.startswith((".", "/", "~")) or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(
            f"reward-model backbone {name!r}: no model folder at {path!r}"
            + (" (and HF_HUB_OFFLINE=1, so it cannot be downloaded)" if os.environ.get("HF_HUB_OFFLINE") == "1" else "")
        )
    return path  # a hub id


def load_backbone(name: str, seed: int, attn_implementation: str | None = None):
    """(model, tokenizer): a one-scalar sequence-classification head on the backbone (last
    non-padding token for decoders, pooled output for encoders), dropout off as in TRL's default.
    `attn_implementation` (e.g. "eager", which Gemma-2's logit soft-capping needs, or "sdpa") is
    passed to transformers; None keeps its default."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_backbone(name)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    config = AutoConfig.from_pretrained(path, num_labels=1)
    for f in _DROPOUT_FIELDS:
        if isinstance(getattr(config, f, None), float):
            setattr(config, f, 0.0)
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)  # the new head's initial weights
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForSequenceClassification.from_pretrained(path, config=config, dtype=torch.float32, **extra)
    return model, tok


def training_device(compute: dict):
    """This process's device and process-group backend: `cuda:LOCAL_RANK` (made current) and NCCL on
    GPUs, the CPU and gloo otherwise. A GPU asked for where there is none is a clear error here, not a
    failure deep inside the first collective."""
    import torch

    if str(compute.get("device", "cpu")).startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("compute.device is cuda, but torch sees no CUDA device in the training process")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), "nccl"
    return torch.device("cpu"), "gloo"


def read_pairs(path: Path) -> list[dict]:
    import polars as pl

    return pl.read_parquet(path).to_dicts() if path and Path(path).exists() else []


def run(job: dict, report=None) -> dict:
    """Trains, evaluates and (rank 0) writes the HF folder; returns the metrics."""
    import torch

    from music_assets.training.rm_data import DataError, PairEncoder
    from music_assets.training.trainer import TrainConfig, accuracy, full_state_dict, pairwise_scores, train

    cfg = TrainConfig(**job["config"])
    compute, strategy = job.get("compute") or {}, job.get("strategy", "ddp")
    device, backend = training_device(compute)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or strategy == "fsdp"  # fsdp: under torchrun
    if distributed:
        torch.distributed.init_process_group(backend=backend)
    rank = torch.distributed.get_rank() if distributed else 0
    torch.set_num_threads(max(1, int(job.get("threads_per_process") or torch.get_num_threads())))
    if cfg.precision == "auto":
        cfg.precision = "bf16" if job.get("bf16_supported") else "fp32"

    def log(record: dict):
        if rank == 0:
            line = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
            (report.log.info if report else print)(f"train {line}")

    rows = {s: read_pairs(Path(job["data"][s])) for s in ("train", "validation", "test") if job["data"].get(s)}
    if cfg.group_by_conversation and rows.get("train") and "group_id" not in rows["train"][0]:
        raise DataError(f"training.options.group_by_conversation needs a group_id column in {job['data']['train']} "
                        "(training_splits exports it since splits-v2: rematerialize it)")
    model, tok = load_backbone(cfg.backbone, cfg.seed, compute.get("attn_implementation"))
    model.to(device)
    encoder = PairEncoder(tok, cfg.max_length, cfg.chat_template)
    data = {s: [encoder.encode(p["chosen"], p["rejected"], p["pair_id"], p.get("group_id") or "") for p in r]
            for s, r in rows.items()}
    state_dir = Path(job["state_dir"]) if job.get("state_dir") else None
    result = train(model, data.get("train", []), data.get("validation", []), cfg, tok.pad_token_id,
                   state_dir=state_dir, log=log, stop_after_steps=job.get("stop_after_steps"), strategy=strategy)
    test_scores = pairwise_scores(model, data.get("test", []), tok.pad_token_id)
    validation_scores = result.final_validation_scores  # the last (or best) validation pass's, when it scored these weights
    if validation_scores is None:
        validation_scores = pairwise_scores(model, data.get("validation", []), tok.pad_token_id)
    validation = by_origin(rows.get("validation", []), validation_scores)
    metrics = {
        "steps": result.steps, "stopped_early": result.stopped_early, "resumed_from_step": result.resumed_from_step,
        "samples_per_second": round(result.samples_per_second, 2), "train_seconds": round(result.seconds, 1),
        "best_validation_accuracy": result.best_validation_accuracy,
        "test_accuracy": accuracy(test_scores) if test_scores else None,
        "test_pairs": len(test_scores), "test_ties": sum(c == r for c, r in test_scores),
        "train_pairs": len(data.get("train", [])), "validation_pairs": len(data.get("validation", [])),
        "truncation": encoder.stats.as_dict(), "processes": int(os.environ.get("WORLD_SIZE", "1")),
        "prefix_sharing": result.prefix_sharing, "prefix_attention": result.prefix_attention,
        "shared_prefix_fraction": round(result.shared_fraction, 3),
        "precision": cfg.precision, "strategy": strategy, "device": str(device), "select": cfg.select,
        # the final weights on the held-out pairs both variants are validated on, by origin
        **{f"validation_accuracy_{origin}": acc for origin, acc in validation.items()},
    }
    state = full_state_dict(model)  # gathered from the shards under FSDP (rank 0): every rank takes part
    if job.get("rank_digest_dir") and state:  # lets a test check that every DDP rank ends with the same weights
        Path(job["rank_digest_dir"]).mkdir(parents=True, exist_ok=True)
        (Path(job["rank_digest_dir"]) / f"rank{rank}.sha256").write_text(weights_digest(state))
    interrupted = job.get("stop_after_steps") is not None and result.steps < (cfg.max_steps or 10**9)
    if rank == 0 and job.get("output_dir") and not interrupted:
        out = Path(job["output_dir"])
        out.mkdir(parents=True, exist_ok=True)
        save_weights(model, state, out)
        tok.save_pretrained(out)
        if cfg.chat_template:
            (out / "music_chat_template.jinja").write_text(encoder.chat_template)
        _plot(result.history, out / CURVE_FILE)
        (out / METADATA_FILE).write_text(json.dumps(
            {"config": asdict(cfg), "metrics": metrics, "history": result.history,
             "upstream": job.get("upstream", {})}, indent=2, default=str))
    if distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return metrics


def save_weights(model, state: dict, out: Path) -> None:
    """A standard Hugging Face folder from a full state dict: the config and safetensors weights
    (split into 5 GB files with an index beyond that, as `save_pretrained` does). Written from the
    state dict rather than by `save_pretrained`, which reads the model's own parameters: under FSDP
    those are shards."""
    from huggingface_hub import save_torch_state_dict

    model.config.save_pretrained(out)
    save_torch_state_dict(state, out, metadata={"format": "pt"})


def by_origin(rows: list[dict], scores: list[tuple[float, float]]) -> dict[str, float]:
    """Accuracy per pair origin (seed | music) of scored rows, in the rows' order."""
    from music_assets.training.trainer import accuracy

    origins = sorted({r.get("origin") or "seed" for r in rows})
    return {o: accuracy([s for r, s in zip(rows, scores) if (r.get("origin") or "seed") == o]) for o in origins}


def weights_digest(state: dict) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _plot(history: list[dict], path: Path) -> None:
    from music_assets.common.plots import figure

    with figure(path) as (fig, ax):
        steps = [h["step"] for h in history if "loss" in h]
        ax.plot(steps, [h["loss"] for h in history if "loss" in h], label="train loss", color="tab:blue")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax2 = ax.twinx()
        val = [(h["step"], h["validation_accuracy"]) for h in history if "validation_accuracy" in h]
        if val:
            ax2.plot(*zip(*val), "o-", label="validation accuracy", color="tab:orange")
        ax2.set_ylabel("accuracy")
        fig.legend(loc="upper right")


def curve_markdown(path: Path) -> str:
    """The training curve as markdown with an inline PNG (how Dagster's UI shows images)."""
    return f"![training curve](data:image/png;base64,{base64.b64encode(Path(path).read_bytes()).decode()})"


def data_version(job: dict) -> str:
    digest = hashlib.sha256(json.dumps(job["config"], sort_keys=True).encode())
    for split in ("train", "validation", "test"):
        p = job["data"].get(split)
        if p and Path(p).exists():
            digest.update(Path(p).read_bytes())
    return digest.hexdigest()[:20]


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    try:
        return _main(job, rank)
    except Exception as exc:
        if rank == 0 and job.get("error_file"):  # the launcher shows this instead of "exit code 1"
            Path(job["error_file"]).write_text(f"{type(exc).__name__}: {exc}")
        raise


def _main(job: dict, rank: int) -> int:
    if rank == 0 and os.environ.get("DAGSTER_PIPES_CONTEXT"):
        from dagster_pipes import open_dagster_pipes

        with open_dagster_pipes() as pipes:
            try:
                metrics = run(job, pipes)
            except Exception as exc:  # the message reaches the Dagster run log before the stack trace
                pipes.log.error(f"reward-model training failed: {type(exc).__name__}: {exc}")
                raise
            pipes.report_asset_materialization(metadata=_flat(metrics), data_version=data_version(job))
        return 0
    metrics = run(job)
    if rank == 0:
        print(json.dumps(metrics))
    return 0


def _flat(metrics: dict) -> dict:
    return {k: ({"raw_value": v, "type": "json"} if isinstance(v, (dict, list)) else v)
            for k, v in metrics.items() if v is not None}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
