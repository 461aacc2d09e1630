"""The judge's context and answer length: a judge prompt holds two whole conversations, so it
outgrows the context the other roles are configured with; the judge gets an engine sized for its
longest prompt plus its answer (up to the model's own limit), and a pair it still cannot judge
(prompt refused, answer cut before the verdict, no verdict) is a judge error with its reason,
never a tie."""

import json
import shutil

import pytest

from music_assets.common.engines import Generation, Sampling
from music_assets.evaluation.judge import judge_pairs, judge_prompt, sized_judge
from music_assets.model_provisioning import resolve_model
from resources.compute import ComputeResource
from resources.vllm_engine import VLLMEngine, _count_prompt_tokens, _tokenizer
from tests.helpers import ENGINE_COMPUTE

MODEL_LIMIT = 4096


def conversation(topic: str, sentences: int) -> list[dict]:
    """A request and a long answer: about 15 tokens per sentence with the tiny Llama's tokenizer."""
    return [{"role": "user", "content": f"Tell me about the {topic}."},
            {"role": "assistant", "content": " ".join(f"the {topic} number {i} is long" for i in range(sentences))}]


@pytest.fixture(scope="module")
def long_llama(tmp_path_factory) -> str:
    """The tiny Llama with a 4096-token limit in its config (RoPE has no learned positions, so the
    same weights run the longer context): the configured 2048 tokens are too few for its judge prompts,
    and the model's limit is one a prompt can still exceed."""
    folder = tmp_path_factory.mktemp("models") / "tiny-llama-4k"
    shutil.copytree(resolve_model("builtin:tiny-llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": MODEL_LIMIT}))
    return str(folder)


@pytest.mark.slow
def test_a_judge_prompt_longer_than_the_configured_context_gets_an_engine_that_fits_it(long_llama):
    engine = VLLMEngine(model=long_llama, compute=ComputeResource(**ENGINE_COMPUTE))
    assert engine.compute.max_model_len == 2048
    fits = (conversation("river", 85), conversation("lake", 85))
    too_long = (conversation("river", 140), conversation("lake", 140))
    lengths = _count_prompt_tokens(_tokenizer(long_llama), [judge_prompt(*fits), judge_prompt(*too_long)])
    assert 2048 < lengths[0] < MODEL_LIMIT - 100 and lengths[1] > MODEL_LIMIT  # measured: 2891 and 4630

    sampling = Sampling(temperature=0.0, top_p=1.0, max_tokens=8)
    sized = engine.sized_for([judge_prompt(*fits)], sampling.max_tokens)
    assert sized.compute.max_model_len == 3072 and engine.compute.max_model_len == 2048  # 2891 + 8 + margin, stepped
    assert engine.sized_for([judge_prompt(*too_long)], 8).compute.max_model_len == MODEL_LIMIT  # capped

    fit, refused = judge_pairs(engine, [fits, too_long], sampling, [1, 2])
    # the ~2900-token prompt was read, not refused; the tiny Llama writes no verdict in 8 tokens: an error, no tie
    assert fit.reason in {"judge_truncated", "unparsed"} and fit.preferred is None
    assert "exceeds max_model_len" not in fit.raw_forward + fit.raw_swapped
    # beyond the model's own limit the engine refuses, and says why
    assert refused.reason == "judge_error" and refused.preferred is None
    assert f"prompt of {lengths[1]} tokens exceeds max_model_len {MODEL_LIMIT}" in refused.raw_forward


class ScriptedJudge:
    """Answers each judge prompt with the next scripted generation; records what sizing it was asked for."""

    model = "scripted"

    def __init__(self, answers: list[Generation]):
        self.answers, self.sized = list(answers), []

    def sized_for(self, conversations, answer_tokens):
        self.sized.append((len(conversations), answer_tokens))
        return self

    def chat(self, conversations, sampling, seeds=None):
        return [self.answers.pop(0) for _ in conversations]


def said(text: str, finish: str = "stop") -> Generation:
    return Generation([text], [finish])


def test_judge_errors_are_told_apart_and_are_never_ties():
    a = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    b = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]
    refusal = Generation([""], ["error"], error="prompt of 5000 tokens exceeds max_model_len 4096")
    forward = [said("A is kind.\n[[A]]"), said("A is kind, B", "length"), said("Both fine."),
               said("Clearly [[A]] and then it rambled", "length"), refusal, said("x", "length")]
    swapped = [said("[[B]]"), said("[[B]]"), said("[[B]]"), said("[[B]]"), said("no verdict"), said("[[C]]")]
    judge = ScriptedJudge(forward + swapped)
    got = judge_pairs(judge, [(a, b)] * 6 + [(a, a)], Sampling(max_tokens=512), list(range(7)))
    assert [(j.preferred, j.reason) for j in got] == [
        ("first", "consistent"),
        (None, "judge_truncated"),  # cut at max_tokens before its verdict: an error, not a tie
        (None, "unparsed"),
        ("first", "consistent"),  # a verdict written before the cut counts
        (None, "judge_error"),  # the refusal outranks the other order's missing verdict
        (None, "judge_truncated"),
        ("tie", "identical"),  # not asked
    ]
    assert got[4].raw_forward == "prompt of 5000 tokens exceeds max_model_len 4096"
    assert judge.sized == [(12, 512)]  # one engine for the whole batch, sized with the answer length


def test_an_engine_that_cannot_choose_its_context_is_used_as_it_is():
    class Server:  # an OpenAI-compatible server: its context is its own
        model = "served"

    server = Server()
    assert sized_judge(server, [[{"role": "user", "content": "x"}]], Sampling()) is server
