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


def _settings(tmp_path, **training):
    return load_settings_in(tmp_path, training={**TRAINING, "options": {**TRAINING["options"], **training}})


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
