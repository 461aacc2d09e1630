"""Simulation throughput: turn-synchronous batching vs a naive loop vs raw vLLM, in one run.

Prints generated tokens/s for
  (a) our simulation: every live context and branch in the engine's running batch at once (each
      request is streamed to vLLM as soon as the answer it depends on is back; retries too),
      DuckDB commits after every turn,
  (b) a naive loop: the same simulation, one context at a time, and every request sent to the
      engine alone (one conversation at a time: no batching at all),
  (c) raw `vllm.LLM.chat` replaying exactly the requests (a) sent, in turn-synchronous batches
      (one call per turn, stage, attempt and continuation: what a step-by-step batched loop sends),
  (c') the same requests in a single `vllm.LLM.chat` call, as if none depended on another (an
      upper bound no simulation can reach: a turn needs the previous one),
and the ratios a/b (target >= 5) and a/c (target >= 0.8), all on the same engine in one process.

    .venv/bin/python benchmarks/simulation_throughput.py [--model builtin:smollm2] [--contexts 16] [--short]

Generation lengths are the product's defaults (`SimulationConfig`: user 96, assistant 256,
rewrite 128 max tokens) unless `--short` (64 / 128 / 64, the earlier runs' setting). How much
batching can gain depends on them: it speeds up decoding, not prompt processing.
"""

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from dagster_duckdb import DuckDBResource

from music_assets.simulation.contexts import sample_context
from music_assets.common.engines import RequestStream, Sampling, continues_final_message, per_request
from music_assets.simulation.config import SimulationConfig
from music_assets.simulation.driver import Engines
from music_assets.simulation.simulate import simulate
from music_assets.simulation.state import Context
from music_assets.common.tables import create_schema
from music_assets.simulation.assets import DuckDBTurnStore
from resources.compute import ComputeResource
from resources.llm import LLMEngine
from resources.vllm_engine import VLLMEngine
from resources.seed_catalog import EMBEDDED_PATH


class RecordingEngine(LLMEngine):
    """Delegates to a real engine and records every request streamed to it, for the raw-vLLM replay."""

    model: str = "recording"
    inner: VLLMEngine
    requests: list = []  # (RequestKey, conversation, sampling, seed)

    def stream(self):
        return RecordingStream(self.inner.stream(), self.requests)

    def identity(self):
        return self.inner.identity()


class RecordingStream(RequestStream):
    def __init__(self, inner: RequestStream, requests: list):
        self.inner, self.requests = inner, requests

    def submit(self, key, conversation, sampling, seed=None, session=None):
        self.requests.append((key, conversation, sampling, seed))
        self.inner.submit(key, conversation, sampling, seed, session=session)

    def wait(self):
        return self.inner.wait()

    @property
    def pending(self):
        return self.inner.pending

    def close(self):
        self.inner.close()


class OneAtATimeEngine(LLMEngine):
    """The naive client: sends each conversation of a batch to the engine on its own, in turn."""

    model: str = "one-at-a-time"
    inner: VLLMEngine

    def chat(self, conversations, sampling, seeds=None):
        seeds = seeds or [None] * len(conversations)
        samplings = per_request(sampling, len(conversations))
        return [self.inner.chat([c], p, [s])[0] for c, p, s in zip(conversations, samplings, seeds)]

    def identity(self):
        return self.inner.identity()


def load_contexts(n: int) -> list[Context]:
    rows = [json.loads(line) for line in EMBEDDED_PATH.read_text().splitlines()][:n]
    out = []
    for r in rows:
        ctx = sample_context({"pair_id": r["id"], "source": "bench", "chosen": r["chosen"]}, 1, 2, seed=0)
        out.append(Context(ctx["context_id"], "bench", ctx["messages"]))
    return out


def run_simulation(engine, contexts, settings, db: Path, label: str):
    warehouse = DuckDBResource(database=str(db))
    with warehouse.get_connection() as con:  # outside Dagster: no resource set-up creates the schema
        create_schema(con)
    store = DuckDBTurnStore(warehouse, label, label)
    started = time.perf_counter()
    stats = simulate(contexts, Engines(engine, engine, engine), settings, store, log=lambda m: print(f"  [{label}] {m}", flush=True))
    return stats.completion_tokens, time.perf_counter() - started, stats


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="builtin:smollm2")
    parser.add_argument("--contexts", type=int, default=16)
    parser.add_argument("--naive-contexts", type=int, default=4, help="naive loop is slow: a subset")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--threads-bind", default=ComputeResource().cpu_threads_bind,
                        help="compute.cpu_threads_bind (default: the product's, chosen from the machine)")
    parser.add_argument("--kv-cache-gib", type=int, default=ComputeResource().cpu_kv_cache_gib,
                        help="compute.cpu_kv_cache_gib (default: the product's, chosen from the machine)")
    parser.add_argument("--short", action="store_true", help="max tokens 64 / 128 / 64 instead of the defaults")
    args = parser.parse_args()

    defaults = SimulationConfig()
    if args.short:
        lengths = {"user": 64, "assistant": 128, "rewrite": 64}
    else:
        lengths = {r: getattr(defaults, f"{r}_sampling").max_tokens for r in ("user", "assistant", "rewrite")}
    settings = replace(defaults, turns=args.turns, contrast_turn=1, min_contrast_turns=min(2, args.turns),
                       **{f"{r}_sampling": replace(getattr(defaults, f"{r}_sampling"), max_tokens=n)
                          for r, n in lengths.items()})
    compute = ComputeResource(cpu_threads_bind=args.threads_bind, cpu_kv_cache_gib=args.kv_cache_gib)
    print(f"max tokens: {lengths}, turns {args.turns}, on_length {settings.on_length}, "
          f"compute: {compute.vllm_environment()}")
    engine = VLLMEngine(model=args.model, compute=compute)
    started = time.perf_counter()
    engine.chat([[{"role": "user", "content": "warm up"}]], Sampling(max_tokens=8))
    print(f"engine load + warm-up: {time.perf_counter() - started:.1f}s ({engine.identity()})", flush=True)
    contexts = load_contexts(args.contexts)

    llm = engine._llm()
    with tempfile.TemporaryDirectory() as tmp:
        # Every phase starts from a cold prefix cache: (c) replays the very prompts (a) sent, and
        # would otherwise read all of (a)'s prefills from the cache and look unfairly fast.
        llm.reset_prefix_cache()
        recorder = RecordingEngine(inner=engine, requests=[])
        tok_a, sec_a, stats = run_simulation(recorder, contexts, settings, Path(tmp) / "a.duckdb", "batched")
        print(f"(a) streamed simulation: {len(contexts)} contexts, {stats.requests} requests, "
              f"{stats.completed} completed, {tok_a} tokens in {sec_a:.1f}s = {tok_a / sec_a:.1f} tok/s", flush=True)
        print(f"    yield: {stats.completed} of {len(contexts)} contexts finished "
              f"({stats.completed / len(contexts):.0%}); dropped {dict(stats.dropped)}; "
              f"{stats.continuations} continuations, {stats.trimmed} trimmed; "
              f"{tok_a / max(1, stats.completed):.0f} generated tokens per MUSIC pair", flush=True)

        llm.reset_prefix_cache()
        tok_b = sec_b = 0.0
        for i, ctx in enumerate(contexts[: args.naive_contexts]):
            t, s, _ = run_simulation(OneAtATimeEngine(inner=engine), [ctx], settings, Path(tmp) / "b.duckdb", f"naive{i}")
            tok_b, sec_b = tok_b + t, sec_b + s
        print(f"(b) naive loop, one conversation at a time: {args.naive_contexts} contexts, "
              f"{tok_b:.0f} tokens in {sec_b:.1f}s = {tok_b / sec_b:.1f} tok/s", flush=True)

    stage_order = {"user": 0, "rewrite": 1, "assistant": 2}
    waves: dict[tuple, list] = {}
    for key, conversation, sampling, seed in recorder.requests:
        waves.setdefault((key.turn, stage_order[key.stage], key.attempt, key.continuation), []).append((conversation, sampling, seed))
    tok_c, sec_c = replay(llm, [waves[w] for w in sorted(waves)])
    print(f"(c) raw vllm.LLM.chat, same requests in {len(waves)} turn-synchronous batches: "
          f"{tok_c} tokens in {sec_c:.1f}s = {tok_c / sec_c:.1f} tok/s", flush=True)
    a, b, c = tok_a / sec_a, tok_b / sec_b, tok_c / sec_c
    print(f"ratio a/b = {a / b:.2f} (target >= 5), a/c = {a / c:.2f} (target >= 0.8)", flush=True)
    tok_u, sec_u = replay(llm, [[r[1:] for r in recorder.requests]])
    print(f"(c') raw vllm.LLM.chat, all {len(recorder.requests)} requests in one call (no dependencies): "
          f"{tok_u} tokens in {sec_u:.1f}s = {tok_u / sec_u:.1f} tok/s; a/c' = {a / (tok_u / sec_u):.2f}")


def replay(llm, batches) -> tuple[int, float]:
    """Raw `LLM.chat`, one call per batch, from a cold prefix cache: generated tokens and seconds."""
    from vllm import SamplingParams

    llm.reset_prefix_cache()
    tokens, seconds = 0, 0.0
    for batch in batches:
        for continuing in (False, True):  # a continuation (`on_length: continue`) goes on with its last message
            part = [r for r in batch if continues_final_message(r[0]) == continuing]
            if not part:
                continue
            params = [SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
                                     seed=seed) for _, s, seed in part]
            started = time.perf_counter()
            outs = llm.chat([conversation for conversation, _, _ in part], params, use_tqdm=False,
                            add_generation_prompt=not continuing, continue_final_message=continuing)
            seconds += time.perf_counter() - started
            tokens += sum(len(c.token_ids) for o in outs for c in o.outputs)
    return tokens, seconds


if __name__ == "__main__":
    main()
