"""Full build of a 5-partition demo vs the incremental refresh after one new seed partition.

Both phases run in a fresh child process against the same Dagster instance and DuckDB file, so
each pays its imports and its vLLM engine load:
- full: the embedded sample plus four seed files (UltraFeedback slices from tests/data) are
  five partitions; one tick of the seed-folder sensor registers and requests them, each
  partition's chain runs (ingestion -> contexts -> simulation -> MUSIC pairs), then dedup,
  splits, both reward models and their evaluation;
- incremental: a fifth file appears; the sensor is evaluated again (it must request exactly the
  new partition), that partition's chain runs, then everything downstream that is stale.
  Nothing of the five existing partitions is regenerated (checked by counting their engine
  requests before and after).

Prints both times and incremental / full (target <= 0.35). Best-of-N and the judge are left out:
they do not depend on the number of seed partitions.

    .venv/bin/python benchmarks/incremental_refresh.py [--model builtin:smollm2] [--contexts 6]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FILES = [f"uf_{i}" for i in range(5)]
SOURCES = ["embedded", *FILES]
TRAINING = {"options": {"backbone": "builtin:minilm", "chat_template": "plain", "max_length": 128, "batch_size": 8,
                        "micro_batch_size": 8, "learning_rate": 5e-5, "max_steps": 10, "eval_every": 0}}


def write_config(work: Path, model: str, contexts: int) -> Path:
    import yaml

    config = {"home": str(work / "home"), "seeds_dir": str(work / "seeds"),
              "models": {"default": {"backend": "vllm", "model": model}}, "compute": {"max_model_len": 2048},
              "simulation": {"max_contexts": contexts, "turns": 2, "user_sampling": {"max_tokens": 64},
                             "assistant_sampling": {"max_tokens": 128}, "rewrite_sampling": {"max_tokens": 64}},
              "training": TRAINING}
    path = work / "music.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def add_seed_file(work: Path, index: int) -> None:
    rows = (REPO / "tests" / "data" / "ultrafeedback" / "eval_clean.jsonl").read_text().splitlines()
    seeds = work / "seeds"
    seeds.mkdir(parents=True, exist_ok=True)
    (seeds / f"{FILES[index]}.jsonl").write_text("\n".join(rows[30 * index : 30 * (index + 1)]) + "\n")


def engine_requests(instance) -> dict[str, int]:
    """Engine requests of each partition's latest simulated_branches materialization."""
    from dagster import AssetKey, AssetRecordsFilter

    out = {}
    for key in SOURCES:
        records = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=AssetKey("simulated_branches"), asset_partitions=[key]), limit=1).records
        if records:
            out[key] = records[0].asset_materialization.metadata["engine_requests"].value
    return out


def child(phase: str, config: Path) -> dict:
    started = time.perf_counter()
    from dagster import DagsterInstance, build_sensor_context, materialize

    from music_assets.assembly import (DATA_ASSETS, EVALUATION_ASSETS, SEED_ASSETS, TRAINING_ASSETS,
                                       build_assets, build_definitions, build_resources)
    from music_assets.training.assets import reward_variants
    from music_assets.settings import load_settings

    settings = load_settings(config)
    resources = build_resources(settings)
    seed_assets, data_assets, training_assets, evaluation_assets = (
        build_assets(settings, stage) for stage in (SEED_ASSETS, DATA_ASSETS, TRAINING_ASSETS, EVALUATION_ASSETS))
    instance = DagsterInstance.get()
    before = engine_requests(instance)
    # What the sensor decides, one tick evaluated for real against the instance.
    defs = build_definitions(settings)
    with build_sensor_context(instance=instance, instance_ref=instance.get_ref(), definitions=defs,
                              resources={"seed_catalog": resources["seed_catalog"]}) as context:
        result = defs.resolve_sensor_def("seed_folder_sensor").evaluate_tick(context)
    new = sorted(r.partition_key for r in result.run_requests)
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    timings = {"startup": time.perf_counter() - started}
    for key in new:
        with timed(timings, "seed chains"):
            assert materialize(seed_assets, partition_key=key, instance=instance, resources=resources).success
    with timed(timings, "dedup + splits"):
        assert materialize(data_assets, instance=instance, resources=resources).success
    for variant in reward_variants.get_partition_keys():
        with timed(timings, "training + evaluation"):
            assert materialize(training_assets + evaluation_assets, partition_key=variant, instance=instance,
                               resources=resources).success
    after = engine_requests(instance)
    unchanged = [k for k in before if after.get(k) == before[k]]
    return {"phase": phase, "seconds": round(time.perf_counter() - started, 1), "partitions_run": new,
            "existing_partitions_untouched": f"{len(unchanged)} of {len(before)}",
            "stage_seconds": {k: round(v, 1) for k, v in timings.items()}}


@contextmanager
def timed(totals: dict[str, float], stage: str):
    began = time.perf_counter()
    yield
    totals[stage] = totals.get(stage, 0.0) + time.perf_counter() - began


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="builtin:smollm2")
    parser.add_argument("--contexts", type=int, default=6, help="seed contexts simulated per partition")
    parser.add_argument("--work", help="keep the DuckDB file, seeds and Dagster home here (default: a temp folder)")
    parser.add_argument("--child")
    parser.add_argument("--config")
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, Path(args.config))), flush=True)  # engines print too
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        config = write_config(work, args.model, args.contexts)
        home = work / "dagster_home"
        home.mkdir(parents=True)
        (home / "dagster.yaml").write_text("concurrency:\n  pools:\n    default_limit: 1\n")
        env = {**os.environ, "DAGSTER_HOME": str(home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        results = {}
        for phase in ("full", "incremental"):
            for i in (range(4) if phase == "full" else [4]):
                add_seed_file(work, i)
            proc = subprocess.run([sys.executable, __file__, "--child", phase, "--config", str(config)],
                                  cwd=REPO, env=env, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{phase} failed:\n{proc.stderr[-4000:]}")
            results[phase] = json.loads([line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
            print(json.dumps(results[phase]), flush=True)
        ratio = results["incremental"]["seconds"] / results["full"]["seconds"]
        print(f"model {args.model}, {args.contexts} contexts per partition: full {results['full']['seconds']} s, "
              f"incremental {results['incremental']['seconds']} s, ratio {ratio:.2f} (target <= 0.35)")


if __name__ == "__main__":
    main()
