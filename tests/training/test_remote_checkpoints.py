"""Checkpoints at an fsspec URL, as evaluation reads them: `CheckpointStore.local_copy` fetches a
version once into the local cache (temp folder, then rename), reuses it without downloading again,
fetches a new version anew, and leaves no cache entry when a fetch fails halfway. Then
rm_evaluation end to end with the store on fsspec's in-memory filesystem: the training job (a
child process) writes locally, the parent uploads, the evaluation scores from the cached copy."""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from resources.checkpoints import CheckpointStore
from tests.helpers import MINILM_TRAINING, load_settings_in


class SpyMemory(MemoryFileSystem):
    """The in-memory filesystem with a store of its own, recording each download (`get`) and each
    file opened for reading; reading a file named `poison` fails like a dropped connection."""

    protocol = "spymem"
    store: dict = {}
    pseudo_dirs = [""]
    gets: list = []
    reads: list = []

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("spymem://"))

    def get(self, rpath, lpath, recursive=False, **kwargs):
        type(self).gets.append(rpath)
        return super().get(rpath, lpath, recursive=recursive, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
        if "r" in mode:
            type(self).reads.append(path)
            if path.endswith("/poison"):
                raise ConnectionError(f"connection dropped while reading {path}")
        return super()._open(path, mode, **kwargs)


@pytest.fixture
def spy():
    fsspec.register_implementation("spymem", SpyMemory, clobber=True)
    SpyMemory.store.clear()
    SpyMemory.pseudo_dirs[:] = [""]
    SpyMemory.gets.clear()
    SpyMemory.reads.clear()
    return SpyMemory


def _folder(path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return path


def _contents(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_url_checkpoint_is_fetched_once_per_version(tmp_path, spy):
    cache = tmp_path / "cache"
    store = CheckpointStore(root="spymem://ckpts/rm", cache_dir=str(cache))
    v1 = {"config.json": '{"v": 1}', "model.safetensors": "weights-1", "tokenizer/vocab.txt": "a b"}
    store.save("music", _folder(tmp_path / "v1", v1), "v1")

    local = store.local_copy("music")
    assert local == cache / "spymem" / "ckpts" / "rm" / "music" / "v1"
    assert _contents(local) == v1 and len(spy.gets) == 1
    assert not [p for p in local.parent.iterdir() if p.name.startswith(".")]  # the temp folder was renamed

    # a second evaluation (a new resource instance, as in a new run): the cached copy, no download
    again = CheckpointStore(root="spymem://ckpts/rm", cache_dir=str(cache)).local_copy("music")
    assert again == local and _contents(again) == v1 and len(spy.gets) == 1

    # a new version: fetched anew; the old copy stays as it was
    v2 = {"config.json": '{"v": 2}', "model.safetensors": "weights-2"}
    store.save("music", _folder(tmp_path / "v2", v2), "v2")
    newer = store.local_copy("music")
    assert newer == local.parent / "v2" and _contents(newer) == v2 and len(spy.gets) == 2
    assert _contents(local) == v1

    # another root with the same variant and version names is another cache entry
    other = CheckpointStore(root="spymem://elsewhere", cache_dir=str(cache))
    other.save("music", _folder(tmp_path / "o", {"config.json": "other"}), "v1")
    assert _contents(other.local_copy("music")) == {"config.json": "other"} and _contents(local) == v1


def test_an_interrupted_fetch_leaves_no_cache_entry(tmp_path, spy):
    cache = tmp_path / "cache"
    store = CheckpointStore(root="spymem://ckpts/rm", cache_dir=str(cache))
    store.save("baseline", _folder(tmp_path / "hf", {"a-config.json": "{}", "poison": "x"}), "v1")

    with pytest.raises(ConnectionError, match="connection dropped"):
        store.local_copy("baseline")
    assert any(r.endswith("/a-config.json") for r in spy.reads)  # it failed halfway, after a file was copied
    assert [p.name for p in (cache / "spymem" / "ckpts" / "rm" / "baseline").iterdir()] == []

    # once the remote is readable, the next evaluation fetches it whole
    SpyMemory.store.pop("/ckpts/rm/baseline/v1/poison")
    assert _contents(store.local_copy("baseline")) == {"a-config.json": "{}"}


def test_local_roots_are_read_in_place_and_a_missing_checkpoint_says_what_to_do(tmp_path):
    store = CheckpointStore(root=str(tmp_path / "store"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match=r"'music'.*materialize reward_model\[music\] first"):
        store.local_copy("music")
    saved = store.save("music", _folder(tmp_path / "hf", {"config.json": "{}"}), "v1")
    assert store.local_copy("music") == Path(saved) and not (tmp_path / "cache").exists()
    remote = CheckpointStore(root=f"memory://{uuid.uuid4().hex}", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match=r"materialize reward_model\[baseline\] first"):
        remote.local_copy("baseline")


@pytest.mark.slow
def test_rm_evaluation_scores_a_checkpoint_stored_at_a_url(tmp_path, monkeypatch):
    """reward_model[baseline] trains in a child process (which never sees the in-memory
    filesystem: it writes a local folder, the asset uploads it), and rm_evaluation[baseline]
    scores from the cached copy; evaluating again downloads nothing."""
    from dagster import DagsterInstance, materialize

    from music_assets.assembly import build_resources
    from music_assets.common.partitions import seed_partitions
    from music_assets.curation.assets import deduplicated_pairs, eval_items, training_splits
    from music_assets.evaluation.assets import rm_evaluation
    from music_assets.seeds.assets import seed_ingestion
    from music_assets.training.assets import reward_model

    bucket = uuid.uuid4().hex
    settings = load_settings_in(tmp_path, training=MINILM_TRAINING, checkpoints=f"memory://{bucket}/rm")
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(seed_partitions.name, ["embedded"])
    resources = build_resources(settings)
    assert materialize([seed_ingestion], partition_key="embedded", instance=instance, resources=resources).success
    assert materialize([eval_items, deduplicated_pairs, training_splits], instance=instance, resources=resources).success
    trained = materialize([reward_model], partition_key="baseline", instance=instance, resources=resources)
    assert trained.success
    url = trained.asset_materializations_for_node("reward_model")[0].metadata["checkpoint"].value
    version = url.rsplit("/", 1)[-1]
    assert url == f"memory://{bucket}/rm/baseline/{version}"
    memory = fsspec.filesystem("memory")
    assert memory.exists(f"/{bucket}/rm/baseline/{version}/music_metadata.json")
    assert not (settings.home / "checkpoints").exists()

    gets = []
    real_get = memory.get
    monkeypatch.setattr(memory, "get", lambda *a, **k: (gets.append(a[0]), real_get(*a, **k))[1])
    scored = []
    for _ in range(2):
        result = materialize([reward_model, rm_evaluation], partition_key="baseline", instance=instance,
                             resources=build_resources(settings), selection=["rm_evaluation"])
        assert result.success
        scored.append(result.asset_materializations_for_node("rm_evaluation")[0].metadata)
    cached = settings.home / "checkpoint_cache" / "memory" / bucket / "rm" / "baseline" / version
    assert len(gets) == 1 and (cached / "music_metadata.json").exists()
    assert scored[0]["checkpoint"].value == scored[1]["checkpoint"].value == str(cached)
    assert scored[0]["accuracy"].value == scored[1]["accuracy"].value
    assert scored[0]["accuracy"].value["heldout_seed"]["n"] > 0
