"""Prefix sharing, side by side in one run on real pairs: Best-of-N scoring, held-out pair scoring and
reward-model training, each with the shared prefix read once against every sequence read whole.

Data (all real text, SmolLM2-135M's chat template):
- seed pairs: the embedded sample (`resources.seed_catalog.EMBEDDED_PATH`) and HH-RLHF multi-turn pairs
  (tests/data/hh-rlhf/harmless-base-test.jsonl.gz), both through `music_assets.seeds.ingest`;
- MUSIC pairs simulated from contexts of both (vLLM, SmolLM2-135M, the paper's T = 5 turns, contrast
  turn drawn from 1-4, so pairs share 0-3 whole simulated turns). The simulation runs once (about 12
  minutes on 2 cores); its pairs are kept in `.music/benchmarks/prefix-sharing-music-pairs.json`
  (gitignored) and a rerun with the same --contexts and --turns reuses them.

Parts:
(a) Best-of-8: each context is a real conversation of 3+ turns cut before one of its assistant turns;
    the 8 candidates are that turn's real answer plus 7 real assistant answers drawn from other
    conversations. `grouped_scores` vs `sequence_scores` over the same sequences, and vs one
    candidate per forward (the evaluation issue's baseline).
(b) held-out pair scoring: random seed pairs per kind (HH, embedded), then held-out conversations as
    `curation.splits` keeps them in one split (the MUSIC pairs with the seed pairs they were simulated
    from), then all together: the mean shared-prefix fraction and the token bounds, then
    `grouped_scores` (SmolLM2: packed rows, pairs that open alike sharing one row), packed rows with
    one row per pair, and (seed sets) the KV-cache kernel, vs `sequence_scores` and vs one pair per
    forward.
(c) reward-model training (`trainer.train`) on a music-variant-like split (seed pairs, MUSIC pairs and
    the seed pairs they were simulated from, kept together as `curation.splits` keeps them): samples/s
    and side tokens/s packed (a micro-batch as one row) vs unpacked, same seed and batches, with per-pair
    batches and with `group_by_conversation`, and the final held-out accuracy; then the grouped run's
    micro-batches packed as one row vs a row per pair.
(d) where sharing stops paying: pair scoring at prefix lengths 8-64 tokens (the scoring threshold
    `prefix_scoring.MIN_SHARED_PREFIX_TOKENS`) and packed training at shared fractions 0.1-0.5 (the
    training auto threshold `trainer.AUTO_MIN_SHARED_FRACTION`), on real pairs cut to those shares.

Timing: CPU seconds of this process (`time.process_time`) with 1 torch thread (--threads), the figure
to trust on a machine other jobs share; wall seconds are printed beside them. Sequences are encoded at
the paper's max_length 2,048. The output also goes to benchmarks/results-prefix-sharing.txt.

    .venv/bin/python benchmarks/prefix_sharing.py [--parts abcd] [--out FILE] [--repeats 2] [--prepare]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HH_PATH = ROOT / "tests" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
MUSIC_CACHE = ROOT / ".music" / "benchmarks" / "prefix-sharing-music-pairs.json"
RESULTS = Path(__file__).resolve().parent / "results-prefix-sharing.txt"


# --- data -----------------------------------------------------------------------------------------


def seed_pairs() -> dict[str, list[dict]]:
    """{'embedded': pairs, 'hh': multi-turn pairs} as `ingest` gives them."""
    from music_assets.seeds.ingest import ingest
    from music_assets.seeds.reader import ResolvedSource
    from resources.seed_catalog import EMBEDDED_PATH

    embedded = ingest(ResolvedSource("embedded", str(EMBEDDED_PATH), "conversational", path=EMBEDDED_PATH)).pairs
    hh = ingest(ResolvedSource("hh", str(HH_PATH), "hh_rlhf", path=HH_PATH)).pairs
    return {"embedded": embedded, "hh": [p for p in hh if p["user_turns"] >= 2]}


def music_pairs(seeds: dict[str, list[dict]], n_contexts: int, turns: int) -> list[dict]:
    """MUSIC pairs simulated from half embedded, half HH contexts; read from the cache when it holds a
    run with the same settings, else simulated with vLLM (minutes) and cached."""
    key = {"contexts": n_contexts, "turns": turns}
    if MUSIC_CACHE.exists():
        cached = json.loads(MUSIC_CACHE.read_text())
        if cached["key"] == key:
            return cached["pairs"]
    from music_assets.simulation.contexts import sample_context

    half = n_contexts // 2
    chosen = seeds["embedded"][:half] + random.Random(0).sample(seeds["hh"], n_contexts - half)
    contexts = [sample_context(p, 1, 2, seed=0) for p in chosen]
    pairs = _simulate([c for c in contexts if c], turns)
    MUSIC_CACHE.parent.mkdir(parents=True, exist_ok=True)
    MUSIC_CACHE.write_text(json.dumps({"key": key, "pairs": pairs}))
    return pairs


def _simulate(contexts: list[dict], turns: int) -> list[dict]:
    """`simulate()` outside Dagster (as benchmarks/simulation_throughput.py runs it), turns kept in
    memory, then `assemble_pairs`. Shorter generations than the product's (user 64, assistant 128,
    rewrite 64 tokens; a cut message is trimmed) keep the run to minutes on 2 cores."""
    from music_assets.common.engines import Sampling
    from music_assets.simulation.config import SimulationConfig
    from music_assets.simulation.driver import Engines
    from music_assets.simulation.pairs import assemble_pairs
    from music_assets.simulation.simulate import simulate
    from music_assets.simulation.state import Context, TurnStore
    from resources.compute import ComputeResource
    from resources.vllm_engine import VLLMEngine

    class MemoryStore(TurnStore):
        def __init__(self):
            self.rows: list[dict] = []

        def load(self):
            return [], []

        def commit(self, rows, drops):
            self.rows += rows

    defaults = SimulationConfig()
    lengths = {"user": 64, "assistant": 128, "rewrite": 64}
    settings = replace(defaults, turns=turns, contrast_turn=None, min_contrast_turns=2, on_length="trim",
                       **{f"{r}_sampling": replace(getattr(defaults, f"{r}_sampling"), max_tokens=n)
                          for r, n in lengths.items()})
    engine = VLLMEngine(model="builtin:smollm2", compute=ComputeResource())
    engine.chat([[{"role": "user", "content": "warm up"}]], Sampling(max_tokens=4))
    store = MemoryStore()
    started = time.perf_counter()
    stats = simulate([Context(c["context_id"], c["source"], c["messages"]) for c in contexts],
                     Engines(engine, engine, engine), settings, store,
                     log=lambda m: print(f"  [simulation] {m}", flush=True))
    print(f"simulated {len(contexts)} contexts in {time.perf_counter() - started:.0f} s wall: {stats.completed} "
          f"finished, dropped {dict(stats.dropped)}", flush=True)
    meta = {"generation_key": "bench", "prompt_version": "bench", "models": "smollm2", "settings": "bench"}
    return assemble_pairs(contexts, [{**r, **meta} for r in store.rows], turns)


# --- measuring ------------------------------------------------------------------------------------


class Report:
    """Prints each line and keeps it under its part, for the results file."""

    def __init__(self):
        self.parts: dict[str, list[str]] = {}
        self.part = "setup"

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.parts.setdefault(self.part, []).append(line)

    def write(self, path: Path) -> None:
        """Replaces the sections of the parts this run measured, keeping the others' from an earlier run."""
        sections: dict[str, list[str]] = {}
        if path.exists():
            name = None
            for line in path.read_text().splitlines():
                if line.startswith("=== "):
                    name = line[4:].split(" ", 1)[0]
                    sections[name] = []
                elif name:
                    sections[name].append(line)
        sections.update(self.parts)
        path.write_text("".join(f"=== {k} ===\n" + "".join(f"{x}\n" for x in v) for k, v in sorted(sections.items())))


def timed(fn, *args, **kw):
    """(result, CPU seconds of this process, wall seconds)."""
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn(*args, **kw)
    return out, time.process_time() - cpu, time.perf_counter() - wall


def flat_scores(model, groups, pad_id):
    """Batched full-sequence scoring (`trainer.sequence_scores`) of every sequence of `groups`."""
    from music_assets.training.trainer import sequence_scores

    return sequence_scores(model, [s for g in groups for s in g], pad_id)


TIMING = {"repeats": 2}  # each scoring timing is the best of this many (--repeats): the shared machine's load only adds


def one_at_a_time(model, groups, pad_id, unit: str):
    """The evaluation issue's baseline: one forward per pair (`unit="group"`, the pair's two sides
    padded together) or per candidate (`unit="sequence"`), no batching across them."""
    from music_assets.training.trainer import sequence_scores

    if unit == "group":
        return [v for g in groups for v in sequence_scores(model, g, pad_id)]
    return [v for g in groups for s in g for v in sequence_scores(model, [s], pad_id)]


def kernel(name: str):
    """The other ways to score groups, by name: the KV-cache kernel, and packed rows with one row per
    group (no row shared across groups: each group's own prefix once, as a per-pair method can)."""
    from music_assets.evaluation.prefix_scoring import packed_prefix_scores, shared_prefix_scores

    return {"KV-cache kernel": shared_prefix_scores,
            "row per group": lambda *a: packed_prefix_scores(*a, share_across_groups=False)}[name]


def compare_scoring(say, model, groups, pad_id, label: str, kernels=("KV-cache kernel",),
                    one: str | None = None) -> dict:
    """Full-sequence vs prefix-shared scoring of the same groups, by `grouped_scores` (what the
    product runs; it says which kernel it took) and by each of `kernels` (see `kernel`); with `one`
    ("group" or "sequence"), also against one pair or one candidate per forward. Rewards must agree
    within 1e-4. The methods take turns, best of `TIMING['repeats']` each. Prints the token bounds:
    tokens of the full sequences over tokens of one packed row per group and of the rows
    `grouped_scores` shares across groups. Returns {method: (best CPU s, best wall s)}."""
    from music_assets.evaluation.prefix_scoring import MAX_SHARED_ROW_TOKENS, grouped_scores, shared_rows
    from music_assets.training.prefix_packing import tree_length

    methods = {"full-sequence": lambda *a: flat_scores(*a), "grouped_scores": lambda *a: grouped_scores(*a),
               **{name: kernel(name) for name in kernels}}
    if one:
        methods[f"one {'pair' if one == 'group' else 'candidate'} per forward"] = lambda *a: one_at_a_time(*a, one)
    best = {name: (float("inf"), float("inf")) for name in methods}
    results = {}
    for _ in range(TIMING["repeats"]):
        for name, fn in methods.items():
            results[name], cpu, wall = timed(fn, model, groups, pad_id)
            best[name] = (min(best[name][0], cpu), min(best[name][1], wall))
    full = results["full-sequence"]
    (cpu_full, wall_full), (_, paths) = best["full-sequence"], results["grouped_scores"]
    results["grouped_scores"] = results["grouped_scores"][0]
    rows = [name for name in methods if name not in ("full-sequence",) and not name.startswith("one ")]
    tokens = sum(len(s) for g in groups for s in g)
    per_group = sum(tree_length(g) for g in groups)
    shared = sum(tree_length([s for i in row for s in groups[i]]) for row in shared_rows(groups, MAX_SHARED_ROW_TOKENS))
    say(f"  {label}: {len(groups)} groups, {sum(map(len, groups))} sequences, {tokens} tokens, shared-prefix fraction "
        f"{prefix_fraction(groups):.2f}; token bounds {tokens / per_group:.2f}x one row per group, "
        f"{tokens / shared:.2f}x rows shared across groups; full-sequence {cpu_full:.1f} CPU s ({wall_full:.1f} wall)")
    for name in rows:
        (cpu, wall), got = best[name], results[name]
        diff = max(abs(a - b) for a, b in zip([v for g in got for v in g], full))
        note = f" [{', '.join(f'{k} {v}' for k, v in sorted(paths.items()))}]" if name == "grouped_scores" else ""
        say(f"    {name:16} {cpu:6.1f} CPU s ({wall:6.1f} wall): {cpu_full / cpu:.2f}x per CPU s, "
            f"{wall_full / wall:.2f}x wall; max reward difference {diff:.1e}{note}")
    for name in [m for m in methods if m.startswith("one ")]:
        (cpu, wall), diff = best[name], max(abs(a - b) for a, b in zip(results[name], full))
        grouped_cpu, grouped_wall = best["grouped_scores"]
        say(f"    against {name} ({cpu:.1f} CPU s, {wall:.1f} wall; max reward difference {diff:.1e}): "
            f"grouped_scores {cpu / grouped_cpu:.2f}x per CPU s ({wall / grouped_wall:.2f}x wall), "
            f"full-sequence batched {cpu / cpu_full:.2f}x")
    return best


def prefix_fraction(groups) -> float:
    """Mean share of a group's longest sequence that lies in the prefix all its sequences share."""
    from music_assets.common.sequences import common_prefix_length

    return sum(common_prefix_length(g) / max(map(len, g)) for g in groups) / len(groups)


# --- the parts ------------------------------------------------------------------------------------


def best_of_n(say, model, encoder, seeds, n_contexts: int, n: int = 8) -> None:
    """(a) Real conversations of 3+ user turns cut before their last assistant answer; candidates: the
    real answer and n - 1 real last answers of other conversations (drawn, seeded)."""
    rng = random.Random(1)
    convs = [p["chosen"] for kind in ("embedded", "hh") for p in seeds[kind]
             if sum(m["role"] == "user" for m in p["chosen"]) >= 3 and p["chosen"][-1]["role"] == "assistant"]
    picked = rng.sample(convs, n_contexts)
    answers = [c[-1]["content"] for c in convs]
    groups = []
    for conv in picked:
        others = rng.sample([a for a in answers if a != conv[-1]["content"]], n - 1)
        groups.append([encoder.encode_one(conv[:-1] + [{"role": "assistant", "content": a}])
                       for a in [conv[-1]["content"], *others]])
    say(f"(a) Best-of-{n}: {n_contexts} real conversations of 3+ user turns (embedded and HH), candidates = the real "
        f"answer + {n - 1} real answers of other conversations; mean shared-prefix fraction "
        f"{prefix_fraction(groups):.2f}")
    compare_scoring(say, model, groups, encoder.tokenizer.pad_token_id, f"Best-of-{n}", one="sequence")


def pair_scoring(say, model, sets: dict[str, list], pad_id: int) -> None:
    """(b) Held-out pairs: random seed pairs of each kind, then held-out conversations as the splits
    keep them (`curation.splits` puts a seed conversation's seed pair and the MUSIC pairs simulated
    from it in one split), then all sets together."""
    say("(b) held-out pair scoring (a group = a pair's two sides; grouped_scores packs pairs that open alike into "
        "one row)")
    total: dict[str, list[float]] = {}
    for label, pairs in sets.items():
        # the KV-cache kernel (other decoders' path) is timed on the small seed sets only: on the 64-pair
        # conversations set it would add about a quarter of an hour
        kernels = ("row per group",) if len(pairs) > 40 else ("KV-cache kernel", "row per group")
        best = compare_scoring(say, model, [[p.chosen, p.rejected] for p in pairs], pad_id, label, kernels, one="group")
        for name, (cpu, wall) in best.items():
            total.setdefault(name, [0.0, 0.0])
            total[name][0] += cpu
            total[name][1] += wall
    groups = [[p.chosen, p.rejected] for pairs in sets.values() for p in pairs]
    (full_cpu, full_wall), (cpu, wall) = total["full-sequence"], total["grouped_scores"]
    one_cpu, one_wall = total["one pair per forward"]
    counts = ", ".join(f"{len(v)} {k.split(':')[0]}" for k, v in sets.items())
    say(f"  all held-out pairs ({len(groups)}: {counts}), "
        f"mean shared-prefix fraction {prefix_fraction(groups):.2f}: grouped_scores {full_cpu / cpu:.2f}x per CPU s "
        f"over full-sequence batched ({full_wall / wall:.2f}x wall); {one_cpu / cpu:.2f}x over one pair per forward "
        f"({one_wall / wall:.2f}x wall)")


def training(say, train_pairs, held_out, pad_id: int, steps: int, max_length: int) -> None:
    """(c) `trainer.train` from the same initial weights: unpacked vs packed (one row per micro-batch), with
    per-pair batches and with `group_by_conversation` (same batches within each pair of runs, so the same
    losses); then the same micro-batches packed as one row vs a row per pair (forward + backward).
    Grouped and per-pair batches draw other pairs into the same number of steps, so beside samples/s each
    run prints the tokens of the sides it trained on and the token slots it computed (unpacked: both
    sides padded to the micro-batch's longest; packed: the rows' tree tokens); side tokens per CPU s
    compares runs over different pairs."""
    from music_assets.training.train_rm import load_backbone
    from music_assets.training.trainer import TrainConfig, accuracy, pairwise_scores, shared_fraction, train

    groups = len({p.group for p in train_pairs})
    say(f"(c) training: {len(train_pairs)} train pairs in {groups} conversations (seed pairs, MUSIC pairs and the seed "
        f"pairs they were simulated from), {len(held_out)} held out, {steps} steps of 4 pairs (micro-batches of 2), "
        f"max_length {max_length}, fp32; mean shared fraction {shared_fraction(train_pairs):.2f}")
    speed, configs = {}, {}
    for grouped in (False, True):
        for mode in ("off", "on"):
            model, _ = load_backbone("builtin:smollm2", 0)
            cfg = TrainConfig(max_length=max_length, batch_size=4, micro_batch_size=2, learning_rate=5e-5,
                              max_steps=steps, eval_every=0, log_every=steps, precision="fp32", prefix_sharing=mode,
                              seed=0, group_by_conversation=grouped)
            result, cpu, wall = timed(train, model, train_pairs, [], cfg, pad_id)
            acc = accuracy(pairwise_scores(model, held_out, pad_id))
            sides, slots = token_counts(micro_batches(train_pairs, cfg, steps), packed=mode == "on")
            speed[grouped, mode] = (result.samples_seen / cpu, result.samples_seen / wall, acc, sides / cpu)
            say(f"  {'packed' if mode == 'on' else 'unpacked'} ({result.prefix_sharing}){', grouped by conversation' * grouped}: "
                f"{result.samples_seen / cpu:.3f} samples per CPU s ({result.samples_seen / wall:.3f} per wall s), "
                f"{sides} side tokens trained, {slots} token slots computed, {sides / cpu:.1f} side tokens per CPU s; "
                f"last loss {result.history[-1]['loss']:.4f}, held-out accuracy {acc:.3f}")
            configs[grouped, mode] = cfg
            del model

    def ratio(a, b, note=""):
        (a_cpu, a_wall, a_acc, a_tok), (b_cpu, b_wall, b_acc, b_tok) = speed[a], speed[b]
        return (f"{a_cpu / b_cpu:.2f}x samples per CPU s ({a_wall / b_wall:.2f}x wall), {a_tok / b_tok:.2f}x side tokens "
                f"per CPU s; held-out accuracy difference {100 * (a_acc - b_acc):+.1f} points{note}")

    say(f"  packed / unpacked: {ratio((False, 'on'), (False, 'off'))}")
    say(f"  packed / unpacked, both grouped by conversation: {ratio((True, 'on'), (True, 'off'))}")
    other = " (other batches, other pairs: not the same run)"
    say(f"  packed grouped / packed per-pair batches: {ratio((True, 'on'), (False, 'on'), other)}")
    say(f"  packed grouped / unpacked per-pair batches: {ratio((True, 'on'), (False, 'off'), other)}")
    row_layouts(say, train_pairs, pad_id, configs[True, "on"], steps)


def micro_batches(train_pairs, cfg, steps: int) -> list[list]:
    """The micro-batches (lists of pairs) that `trainer.train` runs in its first `steps` steps under `cfg`."""
    from music_assets.training.trainer import step_batches

    groups = [p.group for p in train_pairs] if cfg.group_by_conversation else None
    batches = step_batches([p.length for p in train_pairs], cfg.batch_size, cfg.seed, 0, cfg.group_by_length, groups,
                           cfg.micro_batch_size)[:steps]
    return [[train_pairs[i] for i in b[s: s + cfg.micro_batch_size]] for b in batches
            for s in range(0, len(b), cfg.micro_batch_size)]


def token_counts(micro: list[list], packed: bool) -> tuple[int, int]:
    """(tokens of the sides trained on, token slots the forward computes): unpacked, both sides of a micro-
    batch padded to its longest; packed, one row per micro-batch holding the tree of its sides."""
    from music_assets.training.prefix_packing import tree_length

    sides = sum(len(p.chosen) + len(p.rejected) for m in micro for p in m)
    if packed:
        return sides, sum(tree_length([s for p in m for s in (p.chosen, p.rejected)]) for m in micro)
    return sides, sum(2 * len(m) * max(p.length for p in m) for m in micro)


def row_layouts(say, train_pairs, pad_id: int, cfg, steps: int) -> None:
    """The micro-batches of (c)'s grouped run, forward + backward of the BT loss, packed as one row (what
    training runs) and as a row per pair padded to the longest; the tokens each computes."""
    from music_assets.training.prefix_packing import pack_pairs, packed_pair_rewards
    from music_assets.training.train_rm import load_backbone
    from music_assets.training.trainer import bt_loss

    model, _ = load_backbone("builtin:smollm2", 0)
    model.train()
    micro = micro_batches(train_pairs, cfg, steps)
    cpu, slots = {}, {}
    for one_row in (True, False):
        packed = [pack_pairs(m, pad_id, one_row) for m in micro]
        slots[one_row] = (sum(p.real_tokens for p in packed), sum(p.input_ids.numel() for p in packed))
        started = time.process_time()
        for batch in packed:
            bt_loss(*packed_pair_rewards(model, batch), cfg).backward()
            model.zero_grad(set_to_none=True)
        cpu[one_row] = time.process_time() - started
    say(f"  the grouped run's {len(micro)} micro-batches (forward + backward): one row {cpu[True]:.1f} CPU s "
        f"({slots[True][0]} tokens, no padding), a row per pair {cpu[False]:.1f} CPU s ({slots[False][0]} tokens + "
        f"{slots[False][1] - slots[False][0]} padding): one row {cpu[False] / cpu[True]:.2f}x")


def cut_prefix(pair, prefix_tokens: int):
    """The pair with its shared prefix cut to its last `prefix_tokens` tokens (real text either way)."""
    from music_assets.training.rm_data import EncodedPair

    drop = max(0, pair.shared - prefix_tokens)
    return EncodedPair(pair.chosen[drop:], pair.rejected[drop:], pair.pair_id)


def thresholds(say, model, pairs, pad_id: int) -> None:
    """(d) Where sharing stops paying: scoring with short prefixes, training at low shared fractions."""
    from music_assets.evaluation.prefix_scoring import MIN_SHARED_PREFIX_TOKENS
    from music_assets.training.trainer import AUTO_MIN_SHARED_FRACTION, rewards, shared_fraction
    from music_assets.training.prefix_packing import packed_rewards

    say(f"(d) short prefixes: real HH pairs whose shared prefix is cut to P tokens (current scoring threshold "
        f"{MIN_SHARED_PREFIX_TOKENS} tokens)")
    scoring = [p for p in pairs if p.shared >= 128][:4]
    for tokens in (8, 16, 32, 64):
        groups = [[q.chosen, q.rejected] for q in (cut_prefix(p, tokens) for p in scoring)]
        compare_scoring(say, model, groups, pad_id, f"prefix {tokens} tokens",
                        kernels=("KV-cache kernel", "row per group"))
    say(f"    training at low shared fractions (forward + backward of the BT loss, 2 pairs per micro-batch, "
        f"1 warm-up + "
        f"2 timed steps each; current auto threshold {AUTO_MIN_SHARED_FRACTION})")
    from music_assets.training.trainer import TrainConfig, bt_loss

    cfg = TrainConfig()
    model.train()
    long = [p for p in pairs if p.shared >= 0.6 * p.length][:2]
    for fraction in (0.1, 0.2, 0.3, 0.5):
        cut = [cut_prefix(p, round(fraction * (p.length - p.shared) / (1 - fraction))) for p in long]
        cpu = {}
        for step in range(3):
            for name, fn in (("unpacked", rewards), ("packed", packed_rewards)):
                started = time.process_time()
                bt_loss(*fn(model, cut, pad_id), cfg).backward()
                model.zero_grad(set_to_none=True)
                if step:
                    cpu[name] = cpu.get(name, 0.0) + time.process_time() - started
        say(f"    shared fraction {shared_fraction(cut):.2f}: unpacked {cpu['unpacked']:.1f} CPU s, packed "
            f"{cpu['packed']:.1f}: packed {cpu['unpacked'] / cpu['packed']:.2f}x")
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepare", action="store_true", help="only simulate (or load) the MUSIC pairs")
    parser.add_argument("--parts", default="abcd", help="which parts to run (their sections of the results file are "
                                                       "replaced, the others kept)")
    parser.add_argument("--contexts", type=int, default=48, help="MUSIC contexts to simulate")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--best-of-n-contexts", type=int, default=6)
    parser.add_argument("--pairs-per-kind", type=int, default=10, help="held-out seed pairs per kind in (b)")
    parser.add_argument("--train-steps", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=TIMING["repeats"], help="scoring timings: best of this many")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU seconds count every thread)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results file (parts run in parallel: one each)")
    args = parser.parse_args()
    TIMING["repeats"] = args.repeats

    import torch

    torch.set_num_threads(args.threads)
    say = Report()
    seeds = seed_pairs()
    music = music_pairs(seeds, args.contexts, args.turns) if args.prepare or set(args.parts) & set("bc") else []
    say(f"SmolLM2-135M fp32 (fresh reward head), {torch.get_num_threads()} torch thread; {len(seeds['embedded'])} "
        f"embedded, {len(seeds['hh'])} HH multi-turn seed pairs; {len(music)} MUSIC pairs (contrast turns "
        f"{sorted(p['contrast_turn'] for p in music)})")
    if args.prepare:
        return
    from music_assets.training.rm_data import PairEncoder
    from music_assets.training.train_rm import load_backbone

    model, tok = load_backbone("builtin:smollm2", 0)
    model.eval()
    warm = [[list(range(100, 140)), list(range(100, 130)) + [7]]]
    compare_scoring(lambda line: None, model, warm, tok.pad_token_id, "warm-up")  # first calls pay one-time costs
    encoder = PairEncoder(tok, args.max_length)
    encode = lambda rows: [encoder.encode(r["chosen"], r["rejected"], r["pair_id"]) for r in rows]  # noqa: E731
    rng = random.Random(0)
    hh = encode(rng.sample(seeds["hh"], 3 * args.pairs_per_kind))
    embedded = encode(rng.sample(seeds["embedded"], 2 * args.pairs_per_kind))
    music_encoded = encode(music)
    half = len(music_encoded) // 2
    if "a" in args.parts:
        say.part = "a"
        best_of_n(say, model, encoder, seeds, args.best_of_n_contexts)
    if "b" in args.parts:
        say.part = "b"
        by_id = {p["pair_id"]: p for kind in seeds.values() for p in kind}
        origins = encode([by_id[m["seed_pair_id"]] for m in music])
        pair_scoring(say, model, {"seed HH": hh[: args.pairs_per_kind], "embedded": embedded[: args.pairs_per_kind],
                                  f"conversations: {len(music)} MUSIC pairs + the seed pairs they were simulated from":
                                  music_encoded + origins}, tok.pad_token_id)
    if "c" in args.parts:
        say.part = "c"
        k = args.pairs_per_kind
        # a music-variant split keeps a conversation whole (curation.splits): the MUSIC pairs train with the seed
        # pairs they were simulated from; every pair's group is its seed conversation
        by_id = {p["pair_id"]: p for kind in seeds.values() for p in kind}
        origins = list({m["seed_pair_id"]: by_id[m["seed_pair_id"]] for m in music[:half]}.values())
        seeds_alone = [p for p in hh[k: 2 * k] + embedded[k:] if p.pair_id not in {o["pair_id"] for o in origins}]
        train_pairs = ([replace(p, group=p.pair_id) for p in seeds_alone + encode(origins)]
                       + [replace(p, group=m["seed_pair_id"]) for p, m in zip(music_encoded[:half], music[:half])])
        held_out = hh[2 * args.pairs_per_kind:] + music_encoded[half:]
        training(say, train_pairs, held_out, tok.pad_token_id, args.train_steps, args.max_length)
    if "d" in args.parts:
        say.part = "d"
        thresholds(say, model, hh, tok.pad_token_id)
    say.write(args.out)
    print(f"written to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
