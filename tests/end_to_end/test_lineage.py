"""The lineage audit on real runs: seed files -> ingestion -> dedup -> splits -> a MiniLM reward
model on a persistent Dagster instance, then `music-assets lineage` through the CLI, checked
against what the instance and the files say. The slow test adds a real tiny-Llama simulation
and audits the `music` checkpoint's prompt version, engines and sampling."""

import hashlib
import json

import duckdb
import pytest
from dagster import AssetKey, DagsterInstance, materialize

from music_assets import cli
from music_assets.assembly import build_definitions
from music_assets.common.metadata import latest_materialization
from music_assets.common.partitions import seed_partitions
from music_assets.simulation.prompts import PACKAGED
from resources.seed_catalog import EMBEDDED_PATH
from tests.helpers import MINILM_TRAINING, SLICES, load_settings_in, short_tiny_simulation, write_seed

DATA = ["eval_items", "deduplicated_pairs", "training_splits"]
TINY = short_tiny_simulation(max_contexts=4)


class Demo:
    """A small demo run on a persistent instance (DAGSTER_HOME in a temp folder, as the CLI uses)."""

    def __init__(self, tmp_path, monkeypatch, **config):
        home = tmp_path / "dagster_home"
        home.mkdir()
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        monkeypatch.setenv("DAGSTER_HOME", str(home))
        self.settings = load_settings_in(tmp_path, training=MINILM_TRAINING, **config)
        self.config = str(tmp_path / "music.yaml")
        self.settings.seeds_dir.mkdir(parents=True)
        self.seed_file = self.settings.seeds_dir / "uf_slice.jsonl"
        self.sha = write_seed(self.seed_file, SLICES["a"])
        self.defs = build_definitions(self.settings)
        self.instance = DagsterInstance.get()

    def seeds(self, keys, selection=("seed_conversations", "seed_quarantine", "seed_contexts")):
        known = set(self.instance.get_dynamic_partitions(seed_partitions.name))
        self.instance.add_dynamic_partitions(seed_partitions.name, [k for k in keys if k not in known])
        for key in keys:
            result = self.defs.resolve_job_def("seed_chain").execute_in_process(
                partition_key=key, instance=self.instance, asset_selection=[AssetKey(k) for k in selection])
            assert result.success

    def assets(self, keys, partition=None):
        assets = {id(a): a for a in (self.defs.resolve_assets_def(k) for k in keys)}.values()
        # resolved from the Definitions: the code versions the UI shows, resources bound
        result = materialize(list(assets), selection=keys, partition_key=partition, instance=self.instance)
        assert result.success

    def lineage(self, capsys, *args):
        capsys.readouterr()
        code = cli.main(["--config", self.config, "lineage", *args])
        out = capsys.readouterr()
        return code, out.out, out.err

    def version(self, key, partition=None):
        record = latest_materialization(self.instance, AssetKey(key), partition)
        return record.asset_materialization.tags["dagster/data_version"]


@pytest.mark.slow
def test_lineage_of_a_baseline_checkpoint(tmp_path, monkeypatch, capsys):
    demo = Demo(tmp_path, monkeypatch)
    demo.seeds(["embedded", "uf_slice"])
    demo.assets(DATA)
    demo.assets(["reward_model"], partition="baseline")
    versions = {key: demo.version(key) for key in DATA}
    versions.update({f"seed_conversations[{k}]": demo.version("seed_conversations", k) for k in ("embedded", "uf_slice")})

    code, out, _ = demo.lineage(capsys, "baseline", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["warnings"] == []
    checkpoint = report["checkpoint"]
    assert checkpoint["variant"] == "baseline" and checkpoint["backbone"] == "builtin:minilm"
    assert checkpoint["version"] == demo.version("reward_model", "baseline")
    assert checkpoint["recorded_upstream_data_versions"] == {k: versions[k] for k in DATA}

    sources = {s["source"]: s for s in report["seed_sources"]}
    assert set(sources) == {"embedded", "uf_slice"}
    assert sources["uf_slice"]["sha256"] == demo.sha
    assert sources["embedded"]["sha256"] == hashlib.sha256(EMBEDDED_PATH.read_bytes()).hexdigest()
    assert sources["uf_slice"]["location"] == str(demo.seed_file)
    con = duckdb.connect(str(demo.settings.duckdb_path), read_only=True)
    per_source = dict(con.execute("SELECT source, count(*) FROM music.training_splits WHERE variant = 'baseline' "
                                  "GROUP BY 1").fetchall())
    con.close()
    assert {k: s["pairs_in_training_data"] for k, s in sources.items()} == per_source
    assert sources["uf_slice"]["pairs_by_origin"] == {"seed": per_source["uf_slice"]}

    upstream = {n["asset"] + (f"[{n['partition']}]" if n["partition"] else ""): n for n in report["upstream"]}
    for name, version in versions.items():
        assert upstream[name]["data_version"] == version, name
    assert upstream["music_pairs"]["missing"]  # nothing simulated: the audit says so
    assert report["simulation"] == []

    code, text, _ = demo.lineage(capsys, "baseline")
    assert code == 0 and demo.sha in text and versions["training_splits"] in text and "uf_slice" in text

    # the data moves on (the file changes and the data assets are rebuilt); the checkpoint's
    # lineage still names what it was trained on, found from the instance's history
    write_seed(demo.seed_file, SLICES["a"] + [94])  # one more pair: new dedup and split versions
    demo.seeds(["uf_slice"], selection=("seed_conversations", "seed_quarantine"))
    demo.assets(DATA)
    assert demo.version("seed_conversations", "uf_slice") != versions["seed_conversations[uf_slice]"]
    assert demo.version("training_splits") != versions["training_splits"]
    code, out, _ = demo.lineage(capsys, checkpoint["location"], "--json")
    later = json.loads(out)
    assert {s["source"]: s["sha256"] for s in later["seed_sources"]}["uf_slice"] == demo.sha
    assert [n["data_version"] for n in later["upstream"]] == [n["data_version"] for n in report["upstream"]]
    assert any("pair-level counts from DuckDB are omitted" in w for w in later["warnings"])

    code, _, err = demo.lineage(capsys, "music")
    assert code == 2 and "no checkpoint of variant 'music'" in err
    code, _, err = demo.lineage(capsys, str(tmp_path / "nowhere"))
    assert code == 2 and "neither a checkpoint folder nor a variant" in err


@pytest.mark.slow
def test_lineage_of_a_music_checkpoint_names_prompts_models_and_sampling(tmp_path, monkeypatch, capsys):
    demo = Demo(tmp_path, monkeypatch, **TINY)
    demo.seeds(["uf_slice"], selection=("seed_conversations", "seed_quarantine", "seed_contexts",
                                        "simulated_branches", "music_pairs"))
    demo.assets(DATA)
    demo.assets(["reward_model"], partition="music")

    code, out, _ = demo.lineage(capsys, "--json")  # default: the music variant
    assert code == 0
    report = json.loads(out)
    assert report["warnings"] == [] and report["checkpoint"]["variant"] == "music"
    [sim] = report["simulation"]
    recorded = latest_materialization(demo.instance, AssetKey("simulated_branches"), "uf_slice").asset_materialization
    assert sim["prompt_version"] == PACKAGED.version
    assert sim["generation_key"] == recorded.metadata["generation_key"].value
    assert {engine["model"] for engine in sim["models"].values()} == {"builtin:tiny-llama"}
    assert sim["settings"]["turns"] == 2 and sim["settings"]["assistant_sampling"]["max_tokens"] == 32

    con = duckdb.connect(str(demo.settings.duckdb_path), read_only=True)
    used = con.execute("SELECT count(*) FROM music.training_splits WHERE variant = 'music' AND origin = 'music'").fetchone()[0]
    con.close()
    assert used > 0 and sim["music_pairs_in_training_data"] == used
    [generation] = sim["pairs_by_generation"]
    assert generation["prompt_version"] == PACKAGED.version and generation["generation_key"] == sim["generation_key"]
    assert generation["sampling"] == sim["settings"] and generation["models"] == sim["models"]
    assert {s["source"]: s["sha256"] for s in report["seed_sources"]} == {"uf_slice": demo.sha}

    code, text, _ = demo.lineage(capsys, "music")
    assert PACKAGED.version in text and "builtin:tiny-llama" in text and sim["generation_key"] in text
