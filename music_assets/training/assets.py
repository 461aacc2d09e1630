"""The `reward_model` asset: one Bradley-Terry reward model per variant (baseline | music).

Training runs in a child process (`python -m music_assets.training.train_rm`, or torchrun for DDP)
launched through Dagster Pipes, so its log lines and metrics arrive in this materialization. On
Kubernetes the same call becomes a GPU pod by swapping `PipesSubprocessClient` for
`PipesK8sClient` (see the README). The finished Hugging Face folder is committed to the
`CheckpointStore` only after the job succeeds: a failed run leaves the last checkpoint as it was.
"""

import json
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import polars as pl
from dagster import (
    AssetExecutionContext,
    AssetKey,
    DataVersion,
    Failure,
    MaterializeResult,
    MetadataValue,
    PipesSubprocessClient,
    StaticPartitionsDefinition,
    asset,
)

from music_assets.training.rm_data import DataError
from music_assets.curation.splits import SPLITS, VARIANTS
from music_assets.training.train_rm import CURVE_FILE, METADATA_FILE, curve_markdown, data_version, resolve_backbone
from music_assets.training.config import TrainConfig
from resources.checkpoints import CheckpointStore
from resources.compute import ComputeResource
from resources.stage_config import CurationResource, TrainingResource

TRAINER_VERSION = "bt-trainer-v1"
reward_variants = StaticPartitionsDefinition(list(VARIANTS))
VALIDATION_VARIANT = "music"  # whose validation split (seed + MUSIC held-out pairs) both variants use


def training_code_version(options: TrainConfig) -> str:
    """`reward_model`'s code version under a training recipe: the trainer's version and a digest of
    the effective options (defaults filled in, as in the model's data version), so that changing
    them marks the reward models, and through the lineage versions everything downstream,
    unsynced. `processes` and `threads_per_process` change how training runs, not what it
    computes, and do not count. Set where the Definitions are built from the settings; the
    decorated asset below keeps the bare `TRAINER_VERSION`."""
    return f"{TRAINER_VERSION}-{options.fingerprint()[:12]}"


@asset(partitions_def=reward_variants, deps=["training_splits"], code_version=TRAINER_VERSION, group_name="training")
def reward_model(
    context: AssetExecutionContext,
    training: TrainingResource,
    compute: ComputeResource,
    checkpoints: CheckpointStore,
    data: CurationResource,
    pipes_subprocess_client: PipesSubprocessClient,
) -> MaterializeResult:
    """A Bradley-Terry reward model trained on this variant's train split (baseline: seed pairs D;
    music: D + D_MUSIC) on the compute resource's device, DDP or FSDP2 across `training.processes`,
    validated on the same held-out pairs for both variants (the music variant's validation split:
    seed and MUSIC pairs, reported apart), scored on its test split."""
    variant = context.partition_key
    setup = training.settings()
    cfg = setup.options
    resolve_backbone(cfg.backbone)  # a missing model fails here, before any work
    if compute.device.startswith("cuda"):  # a GPU has a fixed budget (a CPU has none): refuse a plan that cannot fit
        import torch

        from music_assets.training.memory_plan import GIB, launch_refusal

        refused = launch_refusal(setup, torch.cuda.get_device_properties(0).total_memory / GIB,
                                 bf16_supported=compute.resolved_dtype() == "bfloat16",
                                 attn_implementation=compute.attn_implementation, warn=context.log.warning)
        if refused:
            raise Failure(f"reward model {variant!r} not launched: {refused}")
    # Both variants validate on the same pairs (the seed and the MUSIC held-out pairs), so checkpoint
    # selection and early stopping cannot favour the variant whose validation set differs.
    split_files = {s: Path(data.settings().exports_dir) / (VALIDATION_VARIANT if s == "validation" else variant)
                   / f"{s}.parquet" for s in SPLITS}
    missing = [str(p) for p in split_files.values() if not p.exists()]
    if missing:
        raise DataError(f"training data for {variant!r} not found: {missing}; materialize training_splits first")
    train_rows = pl.scan_parquet(split_files["train"]).select(pl.len()).collect().item()
    if train_rows == 0:
        raise DataError(f"the {variant!r} train split ({split_files['train']}) is empty: nothing to train on")

    upstream = _upstream_versions(context)
    work = Path(tempfile.mkdtemp(prefix=f"rm-{variant}-"))
    try:
        job = {
            "config": asdict(cfg),
            "data": {s: str(p) for s, p in split_files.items()},
            "output_dir": str(work / "model"),
            "threads_per_process": setup.threads_per_process,
            "bf16_supported": compute.resolved_dtype() == "bfloat16",
            "compute": {"device": compute.device, "attn_implementation": compute.attn_implementation},
            "strategy": setup.strategy,
            "upstream": upstream,
            "error_file": str(work / "error.txt"),
        }
        version = data_version(job)
        job["state_dir"] = str(Path(checkpoints._local_root() if checkpoints._is_local() else work).parent
                               / "training_state" / variant / version)
        (work / "job.json").write_text(json.dumps(job))
        command = [sys.executable, "-m", "music_assets.training.train_rm", str(work / "job.json")]
        if setup.processes > 1 or setup.strategy == "fsdp":
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc_per_node={setup.processes}", "-m", "music_assets.training.train_rm", str(work / "job.json")]
        context.log.info(f"training {variant} reward model: {' '.join(command)}")
        try:
            result = pipes_subprocess_client.run(command=command, context=context).get_materialize_result()
        except Exception as exc:
            error = work / "error.txt"
            if error.exists():  # the training job's own message, e.g. a diverging loss
                raise Failure(f"reward-model training for {variant!r} failed: {error.read_text()}; "
                              f"the previous checkpoint ({checkpoints.latest(variant)}) is unchanged") from exc
            raise
        location = checkpoints.save(variant, work / "model", version)
        shutil.rmtree(job["state_dir"], ignore_errors=True)  # finished: no resume state needed
        saved = json.loads((work / "model" / METADATA_FILE).read_text())
        return MaterializeResult(
            data_version=DataVersion(version),
            metadata={
                **(result.metadata or {}),
                "checkpoint": MetadataValue.path(location),
                "backbone": cfg.backbone,
                "config": MetadataValue.json(saved["config"]),
                "upstream_data_versions": MetadataValue.json(upstream),
                "training_curve": MetadataValue.md(curve_markdown(work / "model" / CURVE_FILE)),
            },
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _upstream_versions(context: AssetExecutionContext) -> dict:
    """Data versions of everything upstream of the splits, as Dagster recorded them."""
    out = {}
    for key in ("training_splits", "deduplicated_pairs", "eval_items"):
        event = context.instance.get_latest_materialization_event(AssetKey(key))
        mat = event.asset_materialization if event else None
        out[key] = (mat.tags or {}).get("dagster/data_version") if mat else None
    return out
