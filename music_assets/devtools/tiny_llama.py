"""A tiny Llama with a locally trained BPE tokenizer, trained for a few seconds on random ChatML
conversations: it talks nonsense, but in short turns that end with `<|im_end|>`, so it exercises
every code path (chat template, vLLM engine, sampling, stop handling) in seconds, offline, on a CPU.

Test and development tooling, not a model the product uses: `music_assets.model_provisioning`
imports this module only when a config names `builtin:tiny-llama` (the tests do) or when
`provision_all` builds every default model. Built once into the model cache
(`music_assets.model_cache`), like the product's models.
"""

import random
from contextlib import contextmanager
from pathlib import Path

from music_assets.model_cache import _set_chatml_ids, build_once, default_cache_dir

# Bump the version when the recipe changes, so that old cache folders are not reused.
TINY_LLAMA_NAME = "tiny-llama-v2"

# Plain ChatML for the tiny model: the same format as SmolLM2, without a default system prompt
# (its ~20 tokens would only cost context in tests).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


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
