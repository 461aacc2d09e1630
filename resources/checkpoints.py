"""Where reward-model checkpoints go: a local directory (default) or an fsspec URL.

A checkpoint is a standard Hugging Face folder (safetensors weights, config, tokenizer, our
`music_metadata.json`). Each save is a new version folder `<root>/<variant>/<version>/`:
- local: written to a hidden temp folder next to it, then renamed (atomic on one filesystem);
- object storage (s3://, gs://, ...): uploaded under the version prefix, and only then is
  `<root>/<variant>/LATEST` rewritten to name it: readers follow LATEST, so they never see a
  partial upload.
A failed training run therefore never touches the previous checkpoint of its variant.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from dagster import ConfigurableResource


class CheckpointStore(ConfigurableResource):
    root: str = ".music/checkpoints"

    def _is_local(self) -> bool:
        return "://" not in self.root or self.root.startswith("file://")

    def _local_root(self) -> Path:
        return Path(self.root.removeprefix("file://")).expanduser()

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
        import fsspec

        fs, path = fsspec.core.url_to_fs(self.root)
        target = f"{path.rstrip('/')}/{variant}/{version}"
        fs.put(str(folder).rstrip("/") + "/", target, recursive=True)
        with fs.open(f"{path.rstrip('/')}/{variant}/LATEST", "w") as f:
            f.write(version)
        return f"{self.root.rstrip('/')}/{variant}/{version}"

    def latest(self, variant: str) -> str | None:
        """The location of the newest committed checkpoint of `variant`, or None."""
        if self._is_local():
            marker = self._local_root() / variant / "LATEST"
            return str((marker.parent / marker.read_text().strip()).resolve()) if marker.exists() else None
        import fsspec

        fs, path = fsspec.core.url_to_fs(self.root)
        marker = f"{path.rstrip('/')}/{variant}/LATEST"
        if not fs.exists(marker):
            return None
        with fs.open(marker) as f:
            return f"{self.root.rstrip('/')}/{variant}/{f.read().decode().strip()}"
