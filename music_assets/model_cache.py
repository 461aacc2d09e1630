"""What every locally built model shares: where it is cached, how a build lands there, and the
ChatML end of turn.

Its own module because both the product's builders (`music_assets.model_provisioning`) and the
tiny Llama of the development tooling (`music_assets.devtools.tiny_llama`) use it, and
model_provisioning imports the tiny Llama (lazily, when a config names it): were these pieces in
model_provisioning, the two modules would import each other.

Builders are idempotent and safe to interrupt: each one builds into a temp folder next to the
final one, writes a `.complete` marker last, and renames the folder into place. A file lock
serializes concurrent builders of the same model; the loser of the race finds the finished
folder and reuses it.
"""

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock


def default_cache_dir() -> Path:
    """Where built models live: `$MUSIC_MODEL_CACHE`, else `~/.cache/music-assets/models`.

    Outside the repo and outside the venv, so that a reinstall or a fresh checkout reuses them.
    """
    env = os.environ.get("MUSIC_MODEL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "music-assets" / "models"


def build_once(final: Path, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp_dir)` unless `final` is already complete, then move the result into place.

    Why this shape: a crash or Ctrl-C leaves only a `.<name>.tmp-*` folder, never a half-written
    `final`, and the next call cleans it up. The lock makes a second process wait instead of
    building the same thing twice; it then sees the marker and returns.
    """
    marker = final / ".complete"
    if marker.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if marker.exists():  # another process finished it while we waited
            return final
        # Whatever is here now was left by an interrupted build: we hold the lock, nobody else
        # is writing it.
        for leftover in final.parent.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        if final.exists():  # a folder without marker, e.g. copied by hand and incomplete
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            build(tmp)
            marker_tmp = tmp / ".complete"
            marker_tmp.write_text(json.dumps({"name": final.name}) + "\n")
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _set_chatml_ids(model, tok) -> None:
    """Make `<|im_end|>` the end of a turn for both transformers and vLLM (which reads
    generation_config.json): a chat model that does not stop there runs on into the next turn."""
    from transformers import GenerationConfig

    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    tok.eos_token = "<|im_end|>"
    if tok.pad_token is None:
        tok.pad_token = "<|endoftext|>"
    model.config.eos_token_id = im_end
    model.config.pad_token_id = tok.pad_token_id
    model.config.bos_token_id = tok.bos_token_id
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=im_end, pad_token_id=tok.pad_token_id
    )
