"""PairEncoder truncation: the template head (BOS, system header) survives, whole oldest turns go
first, the sequence always ends at the true end, and a difference too long alone keeps its last
tokens. A real byte-level BPE tokenizer is trained here in milliseconds; templates are ChatML
(SmolLM2's own), Gemma-style and Llama-3-style, plus the plain rendering."""

import random

import pytest

from music_assets.model_provisioning import SMOLLM2_CHAT_TEMPLATE
from music_assets.training.rm_data import PairEncoder

GEMMA = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role']=='assistant' else m['role'] }}\n"
         "{{ m['content'] }}<end_of_turn>\n{% endfor %}")
LLAMA3 = ("{{ bos_token }}<|start_header_id|>system<|end_header_id|>\n\n{% if messages and messages[0]['role'] == 'system' %}"
          "{{ messages[0]['content'] | trim }}{% else %}You are a helpful assistant.{% endif %}<|eot_id|>"
          "{% for m in messages %}{% if m['role'] != 'system' %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endif %}{% endfor %}")
TEMPLATES = {"gemma": GEMMA, "llama3": LLAMA3, "chatml": SMOLLM2_CHAT_TEMPLATE, "plain": "plain"}
# what each template renders before the first (non-system) message: the head that must survive
HEADS = {"gemma": "<bos>", "llama3": "<bos><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>",
         "chatml": "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n",
         "plain": ""}
SPECIALS = ["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>", "<|im_start|>", "<|im_end|>"]
WORDS = "the a song melody rhythm chord tempo verse chorus bridge guitar piano drum voice sings plays slowly loud".split()


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([" ".join(rng.choices(WORDS, k=12)) for _ in range(300)], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def _text(rng, words):
    return " ".join(rng.choices(WORDS, k=words))


def _conversation(turns, user_words=20, reply_words=30, seed=0, system=None):
    rng = random.Random(seed)
    msgs = [{"role": "system", "content": system}] if system else []
    for _ in range(turns):
        msgs += [{"role": "user", "content": _text(rng, user_words)}, {"role": "assistant", "content": _text(rng, reply_words)}]
    return msgs


def _pair(context, chosen_words=30, rejected_words=25, seed=1):
    rng = random.Random(seed)
    return (context + [{"role": "assistant", "content": "yes " + _text(rng, chosen_words)}],
            context + [{"role": "assistant", "content": "no " + _text(rng, rejected_words)}])


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _starts(enc, msgs):
    """Token index where each message begins in the full rendering (prefix renderings)."""
    return [len(enc.render_ids(msgs[:k])) for k in range(1, len(msgs))]


@pytest.mark.parametrize("name", ["gemma", "llama3", "chatml"])
def test_head_kept_whole_oldest_turns_dropped_end_kept(tok, name):
    enc = PairEncoder(tok, 180, TEMPLATES[name])
    chosen, rejected = _pair(_conversation(5))
    full_c, full_r = enc.render_ids(chosen), enc.render_ids(rejected)
    assert len(full_c) > 360  # 5 turns: well over max_length
    head = _ids(tok, HEADS[name])
    pair = enc.encode(chosen, rejected)

    assert max(len(pair.chosen), len(pair.rejected)) <= 180
    assert pair.chosen[: len(head)] == head and pair.rejected[: len(head)] == head
    boundary = len(full_c) - (len(pair.chosen) - len(head))  # both sides keep what follows it, to the end
    assert pair.chosen[len(head):] == full_c[boundary:] and pair.rejected[len(head):] == full_r[boundary:]
    # the boundary is where a message begins: the oldest turns went whole
    starts = _starts(enc, chosen)
    assert boundary in starts
    # ...and no more of them than needed: keeping one more message would not fit
    earlier = starts[starts.index(boundary) - 1] if starts.index(boundary) else len(head)
    assert len(head) + len(full_c) - earlier > 180
    assert enc.stats.context_truncated == 1 and enc.stats.difference_truncated == 0 and enc.stats.token_level == 0


@pytest.mark.parametrize("name", ["llama3", "chatml"])
def test_system_prompt_is_part_of_the_head(tok, name):
    enc = PairEncoder(tok, 180, TEMPLATES[name])
    chosen, rejected = _pair(_conversation(5, system="Judge the song, briefly."))
    head = enc.render_ids(chosen[:1])
    assert tok.decode(head).count("Judge the song")
    pair = enc.encode(chosen, rejected)
    assert pair.chosen[: len(head)] == head and pair.chosen[-10:] == enc.render_ids(chosen)[-10:]
    assert len(enc.render_ids(chosen)) - (len(pair.chosen) - len(head)) in _starts(enc, chosen)


def test_last_shared_message_keeps_its_header_and_content_end(tok):
    """One long question: dropping it whole would leave the answers without a question, so it is
    kept partly -- its role header, then the end of its content -- and the sequence fills max_length."""
    enc = PairEncoder(tok, 120, GEMMA)
    context = [{"role": "user", "content": _text(random.Random(3), 200)}]
    chosen, rejected = _pair(context, 10, 8)
    pair = enc.encode(chosen, rejected)
    full = enc.render_ids(chosen)
    header = _ids(tok, "<bos><start_of_turn>user\n")
    assert pair.chosen[: len(header)] == header and pair.length == 120
    assert pair.chosen[len(header):] == full[len(full) - (120 - len(header)):]
    assert enc.stats.context_truncated == 1


def test_a_difference_too_long_alone_keeps_its_last_tokens(tok):
    enc = PairEncoder(tok, 100, LLAMA3)
    chosen, rejected = _pair(_conversation(2), 150, 140)
    full_c, full_r = enc.render_ids(chosen), enc.render_ids(rejected)
    head = _ids(tok, HEADS["llama3"])
    pair = enc.encode(chosen, rejected, "p1")
    assert len(pair.chosen) == len(pair.rejected) == 100
    assert pair.chosen == head + full_c[-(100 - len(head)):] and pair.rejected == head + full_r[-(100 - len(head)):]
    assert tok.decode(pair.chosen[-1:]) == "<|eot_id|>"  # the template's end-of-turn: the true end
    assert enc.stats.difference_truncated == 1 and enc.stats.context_truncated == 0 and enc.stats.pairs == 1
    assert enc.stats.as_dict()["difference_truncated"] == 1


@pytest.mark.parametrize("name", TEMPLATES)
def test_shared_counts_the_common_leading_tokens_and_what_fits_is_as_rendered(tok, name):
    enc = PairEncoder(tok, 180, TEMPLATES[name])
    for context in (_conversation(1, 5, 5), _conversation(5)):  # fits; truncated
        pair = enc.encode(*_pair(context))
        s = pair.shared
        assert pair.chosen[:s] == pair.rejected[:s] and pair.chosen[s] != pair.rejected[s]
        assert s > len(_ids(tok, HEADS[name]))  # the context, not just the head
    chosen, rejected = _pair(_conversation(1, 5, 5))  # fits: exactly the template's rendering, as before truncation existed
    pair, template = enc.encode(chosen, rejected), enc.chat_template
    assert pair.chosen == _ids(tok, tok.apply_chat_template(chosen, chat_template=template, tokenize=False))
    assert pair.rejected == _ids(tok, tok.apply_chat_template(rejected, chat_template=template, tokenize=False))
    assert enc.encode_one(chosen) == pair.chosen
    assert enc.stats.pairs == 3 and enc.stats.context_truncated == 1 and enc.stats.conversations_truncated == 0


def test_encode_one_keeps_the_head_and_the_end(tok):
    enc = PairEncoder(tok, 200, GEMMA)
    conversation = _conversation(5)
    ids, full = enc.encode_one(conversation), enc.render_ids(conversation)
    assert ids[0] == tok.bos_token_id and ids[1:] == full[len(full) - len(ids) + 1:]
    assert len(full) - len(ids) + 1 in _starts(enc, conversation)
    long_reply = conversation[:2] + [{"role": "assistant", "content": _text(random.Random(5), 400)}]
    ids, full = enc.encode_one(long_reply), enc.render_ids(long_reply)
    assert len(ids) == 200 and ids[0] == tok.bos_token_id and ids[1:] == full[-199:]
    assert enc.stats.conversations == enc.stats.conversations_truncated == 2


def test_a_template_without_exact_prefixes_falls_back_to_tokens_after_the_head(tok):
    """This template closes every rendering with <eos>, so messages[:k] is no prefix of the whole:
    the cut is at the token level, right after BOS, and still keeps the end."""
    enc = PairEncoder(tok, 150, GEMMA + "<eos>")
    chosen, rejected = _pair(_conversation(5))
    pair, full = enc.encode(chosen, rejected), enc.render_ids(chosen)
    assert pair.chosen[0] == tok.bos_token_id and pair.chosen[1:] == full[-149:]
    assert enc.stats.token_level == 1 and enc.stats.context_truncated == 1
