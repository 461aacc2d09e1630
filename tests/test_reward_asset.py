"""The reward_model asset under real Dagster: embedded seeds -> dedup -> splits -> training via
Pipes into the CheckpointStore; a failing run (missing backbone, NaN loss) leaves the previous
checkpoint of its variant intact and loadable."""

import json

import pytest
from dagster import DagsterInstance, materialize

from music_assets.data_assets import deduplicated_pairs, eval_items, training_splits
from music_assets.definitions import build_resources
from music_assets.partitions import seed_partitions
from music_assets.reward_assets import reward_model
from music_assets.seeds import seed_ingestion
from tests.conftest import load_settings_in

TRAINING = {"options": {"backbone": "builtin:minilm", "chat_template": "plain", "max_length": 48, "batch_size": 8,
                        "micro_batch_size": 8, "learning_rate": 1e-4, "max_steps": 3, "eval_every": 0, "log_every": 1}}


# A RewardBench-format evaluation file: two known subsets, one unknown subset, one empty response.
REWARDBENCH_ROWS = [
    {"prompt": "Name a prime number between 10 and 14.", "chosen": "11, or 13.", "rejected": "12.", "subset": "math-prm"},
    {"prompt": "Write a Python function that returns the square of x.", "chosen": "def sq(x):\n    return x * x",
     "rejected": "def sq(x):\n    return x + x", "subset": "hep-python"},
    {"prompt": "Say hello politely.", "chosen": "Hello, nice to meet you.", "rejected": "What.", "subset": "my-own-subset"},
    {"prompt": "Tell me a fact about owls.", "chosen": "Owls can rotate their heads about 270 degrees.", "rejected": "",
     "subset": "alpacaeval-easy"},
]


def _settings(tmp_path, **training):
    rb = tmp_path / "rewardbench.jsonl"
    rb.write_text("\n".join(json.dumps(r) for r in REWARDBENCH_ROWS) + "\n")
    return load_settings_in(tmp_path, training={**TRAINING, "options": {**TRAINING["options"], **training}},
                            eval_sets={"rb": {"path": str(rb), "format": "prompt_chosen_rejected", "rewardbench": True}})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rm-asset")
    settings = _settings(tmp)
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(seed_partitions.name, ["embedded"])
    resources = build_resources(settings)
    assert materialize([seed_ingestion], partition_key="embedded", instance=instance, resources=resources).success
    assert materialize([eval_items, deduplicated_pairs, training_splits], instance=instance, resources=resources).success
    return tmp, instance


def test_reward_model_asset_trains_through_pipes_and_keeps_checkpoints_safe(prepared):
    from transformers import AutoModelForSequenceClassification

    tmp, instance = prepared
    settings = _settings(tmp)
    result = materialize([reward_model], partition_key="baseline", instance=instance,
                         resources=build_resources(settings), selection=["reward_model"])
    assert result.success
    meta = result.asset_materializations_for_node("reward_model")[0].metadata
    folder = meta["checkpoint"].value
    assert meta["steps"].value == 3 and 0 <= meta["test_accuracy"].value <= 1 and meta["test_pairs"].value > 0
    assert "data:image/png;base64," in meta["training_curve"].value
    assert meta["upstream_data_versions"].value["training_splits"]
    saved = json.loads(open(f"{folder}/music_metadata.json").read())
    assert saved["upstream"] == meta["upstream_data_versions"].value and saved["config"]["max_steps"] == 3
    AutoModelForSequenceClassification.from_pretrained(folder)
    latest = (settings.home / "checkpoints" / "baseline" / "LATEST").read_text()

    # failing runs: a missing backbone, then a diverging loss; neither touches the checkpoint
    for bad, message in (({"backbone": str(tmp / "no-such-model")}, "no model folder"),
                         ({"learning_rate": 1e30}, "loss became")):
        failed = materialize([reward_model], partition_key="baseline", instance=instance, raise_on_error=False,
                             resources=build_resources(_settings(tmp, **bad)))
        assert not failed.success
        logs = "\n".join(str(e.event_specific_data) + (e.message or "") for e in failed.all_events)
        assert message in logs
        assert (settings.home / "checkpoints" / "baseline" / "LATEST").read_text() == latest
        AutoModelForSequenceClassification.from_pretrained(folder)


def test_evaluation_of_both_variants_and_the_report(prepared):
    """Both variants trained, evaluated on held-out pairs and the RewardBench-format set; the
    report compares them with sample sizes, intervals and a significance verdict."""
    import duckdb

    from music_assets.evaluation_assets import evaluation_report, mcnemar_p, rm_evaluation

    tmp, instance = prepared
    settings = _settings(tmp)
    resources = build_resources(settings)
    for variant in ("baseline", "music"):
        result = materialize([reward_model, rm_evaluation], partition_key=variant, instance=instance, resources=resources)
        assert result.success
        meta = result.asset_materializations_for_node("rm_evaluation")[0].metadata
        assert meta["skipped"].value == {"unknown_subset": 1}
        acc = meta["accuracy"].value
        assert acc["heldout_seed"]["n"] > 0 and len(acc["heldout_seed"]["ci95"]) == 2 and acc["rb"]["n"] == 2
    report = materialize([evaluation_report], instance=instance, resources=resources)
    assert report.success
    path = settings.home / "reports" / "evaluation_report.md"
    text = path.read_text()
    assert "| heldout_seed |" in text and "significant" in text and "Chat Hard" in text and "96.9" in text
    assert (settings.home / "reports" / "accuracy_by_turns.png").stat().st_size > 1000
    assert (settings.home / "reports" / "sections.png").exists()
    md = report.asset_materializations_for_node("evaluation_report")[0].metadata["report"].value
    assert "data:image/png;base64," in md
    con = duckdb.connect(str(settings.duckdb_path), read_only=True)
    per_variant = dict(con.execute("SELECT variant, count(*) FROM music.rm_scores GROUP BY 1").fetchall())
    assert per_variant["baseline"] == per_variant["music"] > 0
    quarantined = con.execute("SELECT rule FROM music.eval_quarantine WHERE eval_set = 'rb'").fetchall()
    assert quarantined == [("empty_message",)]
    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(0, 10) == pytest.approx(2 / 1024)
