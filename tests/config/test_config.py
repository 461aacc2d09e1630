"""The config path: typed stage configs written once, YAML files, environment and flags layered
over them, unknown keys refused with their path, source and nearest name, and the Dagster
resources derived from the config classes."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from music_assets.cli import main
from music_assets.common.config import ConfigError, from_mapping
from music_assets.curation.config import CurationConfig
from music_assets.evaluation.config import EvaluationConfig
from music_assets.settings import DEMO_CONFIG, STAGES, load_settings
from music_assets.simulation.config import SimulationConfig
from music_assets.training.config import TrainConfig, TrainingConfig
from resources.stage_config import CurationResource, EvaluationResource, SimulationResource, TrainingResource

RESOURCES = {SimulationConfig: SimulationResource, CurationConfig: CurationResource,
             TrainingConfig: TrainingResource, EvaluationConfig: EvaluationResource}


def write(path, config: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def load(tmp_path, config: dict, **kwargs):
    return load_settings(write(tmp_path / "music.yaml", {"home": "home", **config}), environ={}, **kwargs)


@pytest.mark.parametrize("config, message", [
    ({"simulation": {"turnz": 3}}, "simulation.turnz: unknown key; did you mean 'turns'?"),
    ({"training": {"options": {"learnig_rate": 1e-5}}}, "training.options.learnig_rate: unknown key; did you mean 'learning_rate'?"),
    ({"evaluation": {"judge_sampling": {"max_tokns": 9}}}, "evaluation.judge_sampling.max_tokns: unknown key; did you mean 'max_tokens'?"),
    ({"simulaton": {}}, "simulaton: unknown key; did you mean 'simulation'?"),
    ({"eval_sets": {"x": {"path": "a.jsonl", "rewardbnch": True}}}, "eval_sets.x.rewardbnch: unknown key; did you mean 'rewardbench'?"),
    ({"compute": {"devce": "cpu"}}, "compute.devce: unknown key; did you mean 'device'?"),
    ({"ingest": {"max_message_char": 5}}, "ingest.max_message_char: unknown key; did you mean 'max_message_chars'?"),
    ({"models": {"judge": {"backend": "openai", "base_ur": "http://x"}}}, "models.judge.base_ur: unknown key; did you mean 'base_url'?"),
    ({"models": {"juge": {}}}, "models.juge: unknown key; did you mean 'judge'?"),
    ({"seed_sources": {"s": {"pth": "a.jsonl"}}}, "seed_sources.s.pth: unknown key; did you mean 'path'?"),
])
def test_an_unknown_key_is_refused_with_its_path_source_and_nearest_name(tmp_path, config, message):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, config)
    assert str(err.value) == f"{message} (file {tmp_path / 'music.yaml'})"


@pytest.mark.parametrize("config, where", [
    ({"simulation": {"turns": "three"}}, "simulation.turns: Input should be a valid integer"),
    ({"simulation": {"turns": 0}}, "simulation: Value error, simulation.turns must be >= 1"),
    ({"simulation": {"max_contexts": 0}}, "simulation: Value error, simulation.max_contexts must be >= 1"),
    ({"simulation": {"max_contexts": -3}}, "simulation: Value error, simulation.max_contexts must be >= 1"),
    ({"simulation": {"max_attempts": 0}}, "simulation: Value error, simulation.max_attempts must be >= 1"),
    ({"simulation": {"min_context_exchanges": 0}}, "simulation: Value error, simulation: need 1 <= min_context_exchanges"),
    ({"simulation": {"turns": 3, "contrast_turn": 4}}, "simulation: Value error, simulation.contrast_turn=4 leaves"),
    ({"simulation": {"user_sampling": {"max_tokens": 0}}}, "simulation.user_sampling: Value error, max_tokens must be >= 1"),
    ({"simulation": {"assistant_sampling": {"max_tokens": -5}}},
     "simulation.assistant_sampling: Value error, max_tokens must be >= 1"),
    ({"simulation": {"assistant_sampling": {"temperature": -0.1}}},
     "simulation.assistant_sampling: Value error, temperature must be >= 0"),
    ({"simulation": {"rewrite_sampling": {"top_p": 0}}}, "simulation.rewrite_sampling: Value error, top_p must be in (0, 1]"),
    ({"simulation": {"user_sampling": {"top_p": 1.5}}}, "simulation.user_sampling: Value error, top_p must be in (0, 1]"),
    ({"training": {"options": {"lr_scheduler": "triangle"}}}, "training.options: Value error, lr_scheduler must be"),
    ({"data": {"minhash_bins": 100}}, "data: Value error, bins must be a power of two"),
    ({"compute": {"max_model_len": "long"}}, "compute.max_model_len: Input should be a valid integer"),
    ({"seed_sources": {"s": {"path": "a", "hf_dataset": "b"}}}, "seed_sources.s: set exactly one of `path` or `hf_dataset`"),
    ({"seed_sources": {"Bad Name": {"path": "a"}}}, "seed_sources.Bad Name: invalid seed source name"),
])
def test_a_bad_value_is_refused_with_its_path(tmp_path, config, where):
    with pytest.raises(ConfigError, match="^" + where.replace("(", r"\(").replace(")", r"\)")):
        load(tmp_path, config)


def test_sources_layer_in_order_and_each_value_knows_its_source(tmp_path, monkeypatch):
    base = write(tmp_path / "base" / "base.yaml", {"simulation": {"turns": 4, "seed": 7, "max_contexts": 3},
                                                   "seed_sources": {"s": {"path": "seeds.jsonl"}}})
    config = write(tmp_path / "music.yaml", {"home": "home", "simulation": {"turns": 5},
                                             "seed_sources": {"s": {"hf_dataset": "org/set"}}})
    monkeypatch.chdir(tmp_path)
    settings = load_settings(config, base_files=(base,), flags={"simulation.max_contexts": 2},
                             environ={"MUSIC__SIMULATION__SEED": "9", "MUSIC__DATA__EXPORTS_DIR": "out"})
    sim = settings.simulation
    assert (sim.turns, sim.seed, sim.max_contexts) == (5, 9, 2)
    # a named entry is replaced whole: `path` from the base file does not survive next to `hf_dataset`
    assert settings.seed_sources == {"s": {"hf_dataset": "org/set"}}
    # relative paths: against the file that set them, or the working directory for the environment
    assert settings.home == tmp_path / "home"
    assert settings.data.exports_dir == str(tmp_path / "out")
    origins = {path: origin for path, _, origin, _ in settings.resolved()}
    assert origins["simulation.turns"] == f"file {config}"
    assert origins["simulation.seed"] == "environment"
    assert origins["simulation.max_contexts"] == "command line"
    assert origins["simulation.min_contrast_turns"] == "default"
    assert origins["seed_sources.s.hf_dataset"] == f"file {config}"
    assert origins["duckdb_path"] == "default (under home)"


def test_a_partly_given_sampling_keeps_the_fields_own_defaults(tmp_path):
    settings = load(tmp_path, {"evaluation": {"judge_sampling": {"max_tokens": 64}},
                               "simulation": {"user_sampling": {"max_tokens": 10}}})
    assert (settings.evaluation.judge_sampling.temperature, settings.evaluation.judge_sampling.top_p) == (0.0, 1.0)
    assert settings.simulation.user_sampling.temperature == SimulationConfig().user_sampling.temperature == 0.8


def test_the_environment_reaches_every_key_and_the_old_prompt_variable_is_refused(tmp_path):
    settings = load_settings(None, environ={"MUSIC_HOME": str(tmp_path / "h"), "MUSIC__TRAINING__OPTIONS__MAX_LENGTH": "64"})
    assert settings.home == tmp_path / "h" and settings.training.options.max_length == 64
    with pytest.raises(ConfigError, match="simulation.prompts_dir"):
        load_settings(None, environ={"MUSIC_PROMPTS_DIR": "/x"})


def test_the_demo_config_lies_under_the_users_file_and_the_flag_over_both(tmp_path):
    settings = load(tmp_path, {"simulation": {"turns": 3}}, base_files=(DEMO_CONFIG,),
                    flags={"simulation.max_contexts": 5})
    demo = yaml.safe_load(DEMO_CONFIG.read_text())
    assert settings.simulation.turns == 3  # the user's file wins over the demo's 2
    assert settings.simulation.max_contexts == 5
    assert settings.training.options.backbone == demo["training"]["options"]["backbone"] == "builtin:minilm"
    assert settings.evaluation.contexts_per_source == demo["evaluation"]["contexts_per_source"]


def test_config_command_prints_values_and_sources(tmp_path, capsys, monkeypatch):
    config = write(tmp_path / "music.yaml", {"home": "home", "training": {"options": {"max_length": 99}}})
    monkeypatch.delenv("MUSIC_CONFIG", raising=False)
    monkeypatch.setenv("MUSIC__EVALUATION__TURNS", "4")
    assert main(["--config", str(config), "config", "--demo", "--help-text"]) == 0
    out = capsys.readouterr().out.splitlines()
    line = {row.split()[0]: row for row in out if not row.startswith("#")}
    assert line["training.options.max_length"].endswith(f"99  [file {config}]")
    assert line["training.options.backbone"].endswith(f'"builtin:minilm"  [file {DEMO_CONFIG}]')
    assert line["evaluation.turns"].endswith("4  [environment]")
    assert line["training.options.margin"].endswith("0.0  [default]")
    assert "# tokens per conversation; longer ones are truncated from the left" in out
    bad = write(tmp_path / "bad.yaml", {"training": {"opts": {}}})
    assert main(["--config", str(bad), "config"]) == 2
    assert "training.opts: unknown key; did you mean 'options'?" in capsys.readouterr().err


@pytest.mark.parametrize("cls", list(RESOURCES))
def test_each_stage_config_is_documented_and_its_resource_is_derived_from_it(cls):
    resource = RESOURCES[cls]
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
        field = resource.model_fields[f.name]
        assert field.description == f.metadata["help"]
    assert set(resource.model_fields) == {f.name for f in dataclasses.fields(cls)}
    # the resource's defaults are the config class's defaults: written once
    assert resource().settings() == cls()


def test_a_resource_value_is_validated_like_the_yaml():
    assert SimulationResource(turns=5, user_sampling={"max_tokens": 9}).settings().turns == 5
    with pytest.raises(ConfigError, match="simulation.turns must be >= 1"):
        SimulationResource(turns=0).settings()


def test_every_stage_section_is_its_config_class():
    assert STAGES == {"simulation": SimulationConfig, "data": CurationConfig, "training": TrainingConfig,
                      "evaluation": EvaluationConfig}
    assert from_mapping(TrainingConfig, {"options": {"max_length": 8}}).options == TrainConfig(max_length=8)


def test_prompts_dir_changes_the_simulation_code_version_and_a_missing_folder_is_an_error(tmp_path):
    from music_assets.assembly import build_assets
    from music_assets.simulation.prompts import PACKAGED

    def versions(settings):
        return {spec.key.to_user_string(): spec.code_version for a in build_assets(settings) for spec in a.specs}

    prompts = tmp_path / "prompts"
    prompts.mkdir()
    plain = versions(load(tmp_path, {}))
    same = versions(load(tmp_path, {"simulation": {"prompts_dir": "prompts"}}))
    assert same == plain  # an empty folder: the packaged templates
    (prompts / "judge_pairwise.txt").write_text(PACKAGED.templates["judge_pairwise"] + "\nBe strict.\n")
    edited = versions(load(tmp_path, {"simulation": {"prompts_dir": "prompts"}}))
    changed = {k for k in plain if plain[k] != edited[k]}
    assert changed == {"best_of_n", "judge_agreement", "evaluation_report"}
    with pytest.raises(FileNotFoundError, match="prompts_dir"):
        load(tmp_path, {"simulation": {"prompts_dir": "nowhere"}}).simulation.prompts()
