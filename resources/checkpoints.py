"""Where reward-model checkpoints go: a local directory (default) or an fsspec URL.

A checkpoint is a standard Hugging Face folder (safetensors weights, config, tokenizer, our
`music_metadata.json`). Each save is a new version folder `<root>/<variant>/<version>/`:
- local: written to a hidden temp folder next to it, then renamed (atomic on one filesystem);
- object storage (s3://, gs://, ...): uploaded under the version prefix, and only then is
  `<root>/<variant>/LATEST` rewritten to name it: readers follow LATEST, so they never see a
  partial upload.
A failed training run therefore never touches the previous checkpoint of its variant.

Evaluation loads a checkpoint from local disk (`local_copy`): a local root's folder as it is; a
checkpoint at a URL is fetched once per version into `cache_dir` (downloaded into a hidden temp
folder next to its entry, then renamed, so an interrupted fetch never leaves a folder that looks
complete). A version is the training run's data version (same data, same recipe, seeded), so a
cached copy stays valid for it; a new version is a new entry.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field


class CheckpointStore(ConfigurableResource):
    root: str = Field(".music/checkpoints", description="where checkpoints are saved: a local folder or an fsspec URL")
    cache_dir: str = Field(".music/checkpoint_cache",
                           description="local folder for copies of checkpoints stored at a URL, fetched once per "
                                       "version (<cache_dir>/<protocol>/<path>/<variant>/<version>); unused for a "
                                       "local root")

    def _is_local(self) -> bool:
        return "://" not in self.root or self.root.startswith("file://")

    def _local_root(self) -> Path:
        return Path(self.root.removeprefix("file://")).expanduser()

    def _remote(self):
        """(fsspec filesystem, root path without a trailing slash) of a URL root."""
        import fsspec

        fs, path = fsspec.core.url_to_fs(self.root)
        return fs, path.rstrip("/")

    def save(self, variant: str, folder: Path, version: str) -> str:
        """Commits the finished HF folder `folder` as `version` of `variant`; returns its location."""
        if self._is_local():
            base = self._local_root() / variant
            base.mkdir(parents=True, exist_ok=True)
            final = base / version
            tmp = base / f".tmp-{version}-{uuid.uuid4().hex[:8]}"
            shutil.copytree(folder, tmp)
            if final.exists():  # the same version again (same data and config): replace it whole
                old = base / f".old-{uuid.uuid4().hex[:8]}"
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old)
            else:
                tmp.rename(final)
            (base / ".LATEST.tmp").write_text(version)
            (base / ".LATEST.tmp").replace(base / "LATEST")
            return str(final.resolve())
        fs, path = self._remote()
        target = f"{path}/{variant}/{version}"
        fs.put(str(folder).rstrip("/") + "/", target, recursive=True)
        with fs.open(f"{path}/{variant}/LATEST", "w") as f:
            f.write(version)
        return f"{self.root.rstrip('/')}/{variant}/{version}"

    def latest(self, variant: str) -> str | None:
        """The location of the newest committed checkpoint of `variant`, or None."""
        if self._is_local():
            marker = self._local_root() / variant / "LATEST"
            return str((marker.parent / marker.read_text().strip()).resolve()) if marker.exists() else None
        fs, path = self._remote()
        marker = f"{path}/{variant}/LATEST"
        if not fs.exists(marker):
            return None
        with fs.open(marker) as f:
            return f"{self.root.rstrip('/')}/{variant}/{f.read().decode().strip()}"

    def local_copy(self, variant: str) -> Path:
        """A local folder holding the newest checkpoint of `variant`, to load it from: the folder
        itself under a local root; under a URL, its copy in `cache_dir`, downloaded only when that
        version is not cached yet (only the small LATEST marker is read otherwise)."""
        location = self.latest(variant)
        if location is None:
            raise FileNotFoundError(f"no checkpoint of reward model {variant!r} in {self.root}: "
                                    f"materialize reward_model[{variant}] first")
        if self._is_local():
            return Path(location)
        fs, path = self._remote()
        version = location.rsplit("/", 1)[-1]
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        parts = [p for p in path.split("/") if p not in ("", ".", "..")]
        entry = Path(self.cache_dir).expanduser().joinpath(protocol, *parts, variant, version)
        if entry.is_dir():
            return entry
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.parent / f".tmp-{version}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            # a trailing slash on the source copies the folder's contents into tmp (fsspec's copying rules)
            fs.get(f"{path}/{variant}/{version}/", str(tmp), recursive=True)
            if not any(tmp.iterdir()):
                raise FileNotFoundError(f"the checkpoint {location} named by LATEST is empty or missing")
            try:
                tmp.rename(entry)
            except OSError:  # another process cached the same version first: use its copy
                if not entry.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return entry
