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
    stream = engine.stream()
    stream.submit("long", conv(1), Sampling(max_tokens=300), 1)
    stream.submit("short", conv(2), Sampling(max_tokens=2), 2)
    first = dict(stream.wait())
    assert set(first) == {"short"}  # returned as soon as it finished, the long one still running
    stream.submit("follow-up", conv(3), Sampling(max_tokens=2), 3)  # joins the running batch
    second = dict(stream.wait())
    assert set(second) == {"follow-up"} and stream.pending == 1
    rest = drain(stream)
    assert set(rest) == {"long"} and rest["long"].completion_tokens > 2


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
