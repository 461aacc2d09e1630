"""The vLLM backend's request stream (continuous batching across dependent requests), on a real
in-process engine with the tiny Llama: same generations as `chat`, a request submitted while
others run comes back without waiting for them, refusals per request, and clean abort."""

import pytest

from music_assets.common.engines import Sampling
from resources.compute import ComputeResource
from resources.vllm_engine import VLLMEngine
from tests.helpers import ENGINE_COMPUTE

pytestmark = pytest.mark.slow

MAX_LEN = ENGINE_COMPUTE["max_model_len"]


@pytest.fixture(scope="module")
def engine():
    """The suite's shared tiny-Llama engine (same model and engine arguments as the asset tests)."""
    return VLLMEngine(model="builtin:tiny-llama", compute=ComputeResource(**ENGINE_COMPUTE))


def conv(i):
    return [{"role": "user", "content": f"Tell me about topic number {i}, please."}]


def drain(stream):
    got = {}
    while stream.pending:
        got.update(stream.wait())
    return got


def test_stream_gives_the_same_generations_as_chat(engine):
    sampling = [Sampling(temperature=0.8, max_tokens=24), Sampling(temperature=0.8, max_tokens=40)] * 2
    seeds = [11, 12, 13, 14]
    by_chat = engine.chat([conv(i) for i in range(4)], sampling, seeds)
    stream = engine.stream()
    for i in range(4):
        stream.submit(("k", i), conv(i), sampling[i], seeds[i])
    by_stream = drain(stream)
    assert sorted(by_stream) == [("k", i) for i in range(4)]
    for i, g in enumerate(by_chat):
        s = by_stream[("k", i)]
        assert s.texts == g.texts and s.finish_reasons == g.finish_reasons
        assert s.completion_tokens == g.completion_tokens > 0 and s.prompt_tokens == g.prompt_tokens > 0


def test_a_request_submitted_midway_does_not_wait_for_the_long_ones(engine):
    """Three long requests (up to the context: seconds of decoding, several hundred times the short
    ones' two tokens) run while a short one and then a follow-up come back. Three, not one, so that a
    long one that happens to sample its end-of-sequence token early (the tiny Llama is random) cannot
    make the check pass or fail by itself: the check is that the short answers come back while long
    ones are still running."""
    stream = engine.stream()
    longs = {f"long {i}" for i in range(3)}
    for i, key in enumerate(sorted(longs)):
        stream.submit(key, conv(10 + i), Sampling(max_tokens=MAX_LEN - 64), 10 + i)
    stream.submit("short", conv(2), Sampling(max_tokens=2), 2)
    first = dict(stream.wait())
    assert "short" in first and set(first) - {"short"} < longs and stream.pending >= 1  # long ones still running
    stream.submit("follow-up", conv(3), Sampling(max_tokens=2), 3)  # joins the running batch
    second = dict(stream.wait())
    assert "follow-up" in second and set(second) - {"follow-up"} < longs and stream.pending >= 1
    stream.close()  # aborts the long ones rather than decoding to the end
    assert stream.pending == 0


def test_an_overlong_prompt_is_refused_alone(engine):
    stream = engine.stream()
    stream.submit("ok", conv(1), Sampling(max_tokens=4), 1)
    stream.submit("too-long", [{"role": "user", "content": "word " * (2 * MAX_LEN)}], Sampling(max_tokens=4), 2)
    got = drain(stream)
    assert got["too-long"].finish_reasons == ["error"] and "exceeds max_model_len" in got["too-long"].error
    assert got["ok"].finish_reasons[0] in ("stop", "length") and got["ok"].error is None


def test_close_aborts_in_flight_requests_and_chat_is_not_confused_by_them(engine):
    stream = engine.stream()
    stream.submit("a", conv(1), Sampling(max_tokens=200), 1)
    stream.submit("b", conv(2), Sampling(max_tokens=200), 2)
    with pytest.raises(RuntimeError, match="streamed requests in flight"):
        engine.chat([conv(3)], Sampling(max_tokens=4), [3])
    stream.close()
    assert stream.pending == 0
    out = engine.chat([conv(3), conv(4)], Sampling(max_tokens=4), [3, 4])
    assert len(out) == 2 and all(g.completion_tokens > 0 for g in out)


def test_a_conversation_ending_with_an_answer_continues_that_answer(engine):
    """`on_length: continue` sends the cut answer back as the last message: the engine renders it
    without a generation prompt (`continue_final_message`) and goes on writing the same message."""
    from resources.vllm_engine import VLLMEngine

    llm = engine._llm()
    partial = [{"role": "user", "content": "Tell me about topic number 3, please."},
               {"role": "assistant", "content": "Topic three is"}]
    tok = llm.get_tokenizer()
    rendered = tok.apply_chat_template(partial, tokenize=False, continue_final_message=True, add_generation_prompt=False)
    assert rendered.rstrip().endswith("Topic three is")  # no end of turn, no new assistant header
    (length,) = VLLMEngine._prompt_lengths(llm, [partial])
    assert length == len(tok.encode(rendered, add_special_tokens=False))
    sampling = Sampling(temperature=0.0, max_tokens=8)
    fresh = [{"role": "user", "content": "Tell me about topic number 4, please."}]
    via_chat = engine.chat([partial, fresh], sampling, [1, 2])  # one batch mixing both kinds
    stream = engine.stream()
    stream.submit("p", partial, sampling, 1)
    stream.submit("f", fresh, sampling, 2)
    streamed = drain(stream)
    assert [g.text for g in via_chat] == [streamed["p"].text, streamed["f"].text]
    new_turn = engine.chat([partial[:1]], sampling, [1])[0]
    assert via_chat[0].prompt_tokens < new_turn.prompt_tokens + 4 + len(tok.encode("Topic three is"))
    assert via_chat[0].prompt_tokens == length


def test_system_messages_are_folded_when_the_template_refuses_them(tmp_path):
    """Gemma-2's chat template raises on a system turn. The user simulator's instruction is a
    system message, so with such a model it must go into the first user turn, not crash the run
    nor be dropped."""
    import shutil

    from music_assets.common.engines import fold_system_messages
    from music_assets.devtools.tiny_llama import tiny_llama_dir
    from resources.vllm_engine import VLLMEngine, template_accepts_system

    folder = tmp_path / "no-system-llama"
    shutil.copytree(tiny_llama_dir(), folder)
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}{% endfor %}" + template)
    from transformers import AutoTokenizer

    assert not template_accepts_system(AutoTokenizer.from_pretrained(folder))
    assert template_accepts_system(AutoTokenizer.from_pretrained(tiny_llama_dir()))

    conv = [{"role": "system", "content": "You play the user."}, {"role": "user", "content": "Hello there."}]
    assert fold_system_messages(conv) == [{"role": "user", "content": "You play the user.\n\nHello there."}]
    assert fold_system_messages(conv[:1] + [{"role": "assistant", "content": "Hi"}])[0] == {
        "role": "user", "content": "You play the user."}

    strict = VLLMEngine(model=str(folder), compute=ComputeResource(**ENGINE_COMPUTE))
    sampling = Sampling(temperature=0.0, max_tokens=8)
    (out,) = strict.chat([conv], sampling, [3])
    assert out.finish_reasons[0] != "error" and out.text
    stream = strict.stream()
    stream.submit("k", conv, sampling, 3)
    assert drain(stream)["k"].text == out.text
    # the instruction reached the model: the prompt is the folded conversation's, token for token
    tok = strict._llm().get_tokenizer()
    folded = tok.apply_chat_template(fold_system_messages(conv), tokenize=False, add_generation_prompt=True)
    assert out.prompt_tokens == len(tok.encode(folded, add_special_tokens=False))
