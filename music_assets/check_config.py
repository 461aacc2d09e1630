"""`music-assets check-config F`: a config checked and planned, with nothing run.

Loading the settings already checks every key and value (unknown keys, types, nonsense values,
each with its path and source). This adds the plan a user needs before spending a GPU-hour: the
partitions each seed source becomes, the requests and generated tokens of every stage, the GPU
memory of a training rank and the training time, and what the config still needs from the user
(endpoints, API keys by variable name, storage URLs, placeholders).

The token figures are estimates, with their assumptions named in `ASSUMPTIONS`: a generation's
mean length is the share of its `max_tokens` that the demo measured (SmolLM2-135M, on_length
trim), and the cap (every generation at `max_tokens`) is printed beside it as the upper bound.
"""

from __future__ import annotations

import gzip
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from music_assets.settings import Settings

# Measured on the demo (configs/demo.yaml, SmolLM2-135M, bf16 CPU, on_length trim, 8 of 8
# contexts finished): mean generated tokens of a kept message as a share of its max_tokens (user
# 75 of 96, assistant 145 of 256), attempts per generation (1.03), contexts that finish (8 of 8).
MEASURED_SHARE = {"user": 75 / 96, "assistant": 145 / 256, "rewrite": 0.5, "judge": 0.5}
MEASURED_ATTEMPTS = 1.03
MEASURED_YIELD = 1.0
# A seed context of up to 3 exchanges (max_context_exchanges), in tokens, and the chat template's
# and instructions' overhead: assumptions for the longest prompt, named in ASSUMPTIONS.
SEED_CONTEXT_TOKENS, PROMPT_OVERHEAD_TOKENS = 1024, 256
# Rows of public datasets named by `hf_dataset` (their cards), for planning without downloading.
KNOWN_ROWS = {
    "Skywork/Skywork-Reward-Preference-80K-v0.2": 77016,
    "allenai/reward-bench": 2985,  # split filtered
    "Anthropic/hh-rlhf": 8552,  # split test: harmless-base, helpful-base, -online, -rejection-sampled
    "openbmb/UltraInteract_sft": 288579,
}
# Simulation on a vLLM fleet: a published ~12,500 output tokens/s for Llama-3.1-8B BF16 on one
# H100 with short ShareGPT prompts; our prompts are long multi-turn contexts (prefill-heavy), so the
# plan takes 40% of it for a 9B model.
FLEET_TOKENS_PER_GPU_SECOND = 5000
# Training: 6 x parameters x tokens FLOPs (forward + backward; x 4/3 with gradient checkpointing,
# which recomputes the forward), at 40% of an H100's 989 dense bf16 TFLOP/s.
GPU_FLOPS, MFU = 989e12, 0.40
ASSUMPTIONS = [
    "generated tokens per message: the demo's measured share of max_tokens (user 78%, assistant 57%); "
    "upper bound: every message at max_tokens",
    f"attempts per generation {MEASURED_ATTEMPTS} and {MEASURED_YIELD:.0%} of contexts finishing (demo, on_length trim)",
    f"fleet: {FLEET_TOKENS_PER_GPU_SECOND:,} generated tokens/s per H100 (40% of a published 12,500 for an 8B "
    "model with short prompts; multi-turn prompts are prefill-heavy)",
    f"longest prompt: a seed context of {SEED_CONTEXT_TOKENS:,} tokens and {PROMPT_OVERHEAD_TOKENS} of template and "
    "instructions, plus every simulated message at max_tokens",
    f"training: 6 x parameters x tokens FLOPs (x 4/3 with gradient checkpointing), every sequence at max_length, "
    f"{MFU:.0%} of {GPU_FLOPS / 1e12:.0f} TFLOP/s per GPU",
]
PLACEHOLDER = re.compile(r"my-bucket|example\.(com|org)|\.internal\b|localhost|/shared/")


@dataclass
class Plan:
    lines: list[str] = field(default_factory=list)
    needs: list[str] = field(default_factory=list)  # what the user must still provide
    problems: list[str] = field(default_factory=list)  # what makes the run impossible as configured
    totals: dict[str, float] = field(default_factory=dict)  # the headline figures (README's cost table)

    def section(self, title: str) -> None:
        self.lines += ["", f"## {title}"]

    def add(self, text: str) -> None:
        self.lines.append(text)


def source_rows(spec: dict) -> tuple[int | None, str]:
    """(rows, how they were counted) of a seed source or evaluation set, without loading it."""
    if spec.get("hf_dataset"):
        rows = KNOWN_ROWS.get(spec["hf_dataset"])
        return rows, "dataset card" if rows else "unknown (not in KNOWN_ROWS)"
    path = Path(spec["path"]).expanduser()
    if not path.is_file():
        return None, f"missing file {path}"
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows, "file"
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        return sum(1 for line in f if line.strip()), "file (lines)"


def simulation_requests(turns: int, min_contrast_turns: int, contrast_turn: int | None) -> dict[str, float]:
    """Expected requests per context by stage, over the contrast turn c (fixed, or uniform over
    [1, T - min_contrast_turns + 1]): before c one user message and one answer per turn; at c a
    shared user message, the rewrite and two answers; after c two of each."""
    cs = [contrast_turn] if contrast_turn else list(range(1, turns - min_contrast_turns + 2))
    per_c = [{"user": (c - 1) + 1 + 2 * (turns - c), "rewrite": 1, "assistant": (c - 1) + 2 + 2 * (turns - c)}
             for c in cs]
    return {stage: sum(r[stage] for r in per_c) / len(per_c) for stage in ("user", "rewrite", "assistant")}


def check(settings: Settings, gpu_memory_gib: float = 80.0) -> Plan:
    plan = Plan()
    _partitions_and_simulation(plan, settings)
    _best_of_n(plan, settings)
    _training(plan, settings, gpu_memory_gib)
    _needs(plan, settings)
    plan.section("Assumptions")
    plan.lines += [f"- {a}" for a in ASSUMPTIONS]
    return plan


def _partitions_and_simulation(plan: Plan, settings: Settings) -> None:
    sim = settings.simulation
    plan.section("Seed sources and simulation")
    per_context = simulation_requests(sim.turns, sim.min_contrast_turns, sim.contrast_turn)
    caps = {"user": sim.user_sampling.max_tokens, "assistant": sim.assistant_sampling.max_tokens,
            "rewrite": sim.rewrite_sampling.max_tokens}
    contexts = 0
    for name, spec in settings.seed_sources.items():
        rows, how = source_rows(spec)
        shards = spec.get("shards", 1)
        if rows is None:
            plan.needs.append(f"seed_sources.{name}: row count {how}; the plan counts 0 rows for it")
            rows = 0
        mine = rows if sim.max_contexts is None else min(rows, sim.max_contexts)
        contexts += mine
        plan.add(f"- {name}: {rows:,} pairs ({how}); {shards} partition(s)"
                 + (f" of ~{rows // shards:,} pairs" if shards > 1 else "") + f"; {mine:,} contexts simulated")
    requests = {stage: contexts * n * MEASURED_ATTEMPTS for stage, n in per_context.items()}
    tokens = {stage: requests[stage] * caps[stage] * MEASURED_SHARE[stage] for stage in requests}
    bound = {stage: requests[stage] * caps[stage] for stage in requests}
    pairs = int(contexts * MEASURED_YIELD)
    plan.add(f"- T = {sim.turns}, c in [1, {sim.turns - sim.min_contrast_turns + 1}]"
             f"{' (fixed ' + str(sim.contrast_turn) + ')' if sim.contrast_turn else ''}; "
             f"per context: " + ", ".join(f"{n:.1f} {stage}" for stage, n in per_context.items()) + " requests")
    for stage in requests:
        plan.add(f"- {stage}: {requests[stage]:,.0f} requests, ~{tokens[stage] / 1e6:,.1f}M generated tokens "
                 f"(at most {bound[stage] / 1e6:,.1f}M; max_tokens {caps[stage]})")
    total, total_bound = sum(tokens.values()), sum(bound.values())
    gpu_hours = total / FLEET_TOKENS_PER_GPU_SECOND / 3600
    plan.add(f"- simulation: ~{pairs:,} MUSIC pairs, ~{total / 1e6:,.0f}M generated tokens (at most "
             f"{total_bound / 1e6:,.0f}M), ~{total / max(pairs, 1):,.0f} per pair; "
             f"~{gpu_hours:,.0f} GPU-hours on the fleet (at most {total_bound / FLEET_TOKENS_PER_GPU_SECOND / 3600:,.0f})")
    context_needed = SEED_CONTEXT_TOKENS + sim.turns * (caps["user"] + caps["assistant"]) + PROMPT_OVERHEAD_TOKENS
    plan.add(f"- longest simulation prompt: ~{context_needed:,} tokens (a seed context of ~{SEED_CONTEXT_TOKENS:,}, "
             f"then {sim.turns} turns of user and assistant messages at max_tokens): the engines' context must hold it")
    _engine_context(plan, settings, context_needed)
    ratio = settings.data.music_ratio
    if ratio is not None:
        plan.add(f"- curation: music_ratio {ratio}: the music variant trains on its seed train pairs plus "
                 f"{ratio} MUSIC pairs per seed pair (all {pairs:,} when fewer)")
    plan.totals.update(simulation_tokens=total, simulation_gpu_hours=gpu_hours, music_pairs=pairs)


def _engine_context(plan: Plan, settings: Settings, needed: int) -> None:
    """An in-process vLLM engine's context is compute.max_model_len; a server's is its own
    `--max-model-len`, which the config cannot see: then it is a requirement to state."""
    for role in ("user_simulator", "assistant", "rewriter"):
        spec = settings.models.get(role, {})
        if spec.get("backend", "vllm") == "vllm":
            have = settings.compute.get("max_model_len", 2048)
            if have < needed:
                plan.problems.append(f"models.{role}: compute.max_model_len {have} < the ~{needed:,} tokens a last "
                                     "turn's prompt can reach (raise it, or lower turns / max_tokens)")
        else:
            plan.needs.append(f"models.{role}: the server at {spec.get('base_url')} must serve with --max-model-len "
                              f">= {needed:,} (the config cannot check a server's context)")


def _best_of_n(plan: Plan, settings: Settings) -> None:
    ev = settings.evaluation
    plan.section("Evaluation")
    prompts = 0
    for name, spec in settings.data.eval_sets.items():
        raw = {"path": spec.path, "hf_dataset": spec.hf_dataset}
        rows, how = source_rows(raw)
        kind = "RewardBench pairs" if spec.rewardbench else f"format {spec.format}"
        limit = ev.max_contexts.get(name, ev.contexts_per_source)
        used = None if spec.rewardbench else (rows if limit is None or rows is None else min(rows, limit))
        plan.add(f"- {name}: {rows if rows is not None else '?'} rows ({how}), {kind}"
                 + (f"; {used:,} Best-of-N prompts" if used and spec.format in ("prompts", "hh_prompts", "ultrainteract")
                    else ""))
        if spec.format in ("prompts", "hh_prompts", "ultrainteract") and used:
            prompts += used
    runs = prompts * len(ev.best_of_n) * 2  # both reward models
    candidates = prompts * sum(ev.best_of_n) * ev.turns * 2
    policy_tokens = candidates * ev.policy_sampling.max_tokens * MEASURED_SHARE["assistant"]
    user_requests = runs * max(0, ev.turns - 1)
    judge_requests = prompts * len(ev.best_of_n) * 2 + ev.agreement_pairs * len(settings.data.eval_sets) * 2
    plan.add(f"- Best-of-N: {prompts:,} prompts x N in {ev.best_of_n} x {ev.turns} turns x 2 reward models: "
             f"{candidates:,} candidates, ~{policy_tokens / 1e6:,.0f}M policy tokens, {user_requests:,} user-simulator "
             f"requests, {judge_requests:,} judge requests (both orders)")
    plan.totals["bon_tokens"] = policy_tokens


def _training(plan: Plan, settings: Settings, gpu_memory_gib: float) -> None:
    from music_assets.training.memory_plan import backbone_config, gib, parameter_count, plan_memory

    tr = settings.training
    opts = tr.options
    plan.section("Training (per reward model; the baseline and music variants each train once)")
    try:
        config = backbone_config(opts.backbone, settings.compute.get("attn_implementation"))
    except (ValueError, OSError) as exc:
        plan.needs.append(f"training.options.backbone: no config to plan from ({exc})")
        return
    memory = plan_memory(config, opts, tr, gpu_memory_gib)
    params = parameter_count(config)
    verdict = "fits" if memory.fits else "does NOT fit"
    plan.add(f"- {opts.backbone}: {params / 1e9:.2f}B parameters, {tr.processes} x {tr.strategy}, {memory.precision}, "
             f"gradient checkpointing {'on' if opts.gradient_checkpointing else 'off'}: {gib(memory.total)} per rank "
             f"of {gib(memory.usable)} usable on a {gpu_memory_gib:g} GiB GPU: {verdict}")
    if not memory.fits:
        plan.problems.append(f"training: {gib(memory.total)} per rank does not fit {gib(memory.usable)} "
                             f"(`music-assets --config F plan-training` shows the parts)")
    steps = opts.max_steps
    if steps is None:
        plan.add("- training time: max_steps is unset (epochs over the data): not planned")
        return
    tokens = steps * opts.batch_size * 2 * opts.max_length
    flops = 6 * params * tokens * (4 / 3 if opts.gradient_checkpointing else 1)
    gpu_hours = flops / (GPU_FLOPS * MFU) / 3600
    plan.add(f"- {steps:,} steps x {opts.batch_size} pairs x 2 sides x {opts.max_length} tokens = {tokens / 1e9:.2f}B "
             f"tokens: ~{gpu_hours:,.0f} GPU-hours, ~{gpu_hours / tr.processes:,.1f} h on {tr.processes} GPUs")
    plan.totals["training_gpu_hours"] = gpu_hours


def _needs(plan: Plan, settings: Settings) -> None:
    for role, spec in sorted(settings.models.items()):
        if spec.get("backend") == "openai":
            url = spec.get("base_url", "")
            if PLACEHOLDER.search(url):
                plan.needs.append(f"models.{role}.base_url: {url} looks like a placeholder: your endpoint")
            env = spec.get("api_key_env")
            if env and not os.environ.get(env):
                plan.needs.append(f"models.{role}: the API key in ${env} (not set here)")
    warehouse = settings.warehouse
    if warehouse.get("backend") == "ducklake":
        for key in ("catalog", "data_path"):
            if PLACEHOLDER.search(str(warehouse.get(key, ""))):
                plan.needs.append(f"warehouse.{key}: {warehouse[key]} looks like a placeholder")
        plan.needs.append("warehouse: the Postgres password in PGPASSWORD or ~/.pgpass (libpq)")
    for key, value in (("checkpoints", settings.checkpoints), ("home", str(settings.home))):
        if PLACEHOLDER.search(value):
            plan.needs.append(f"{key}: {value} looks like a placeholder (shared storage every worker reaches)")
    if settings.checkpoints.startswith(("s3://", "gs://", "az://")):
        plan.needs.append(f"checkpoints: credentials for {settings.checkpoints.split('://')[0]} in the environment")
    hf = [n for n, s in settings.seed_sources.items() if s.get("hf_dataset")]
    hf += [n for n, s in settings.data.eval_sets.items() if s.hf_dataset]
    if hf:
        plan.needs.append(f"network access to the Hugging Face hub and the `datasets` package for: {', '.join(hf)}")


def render(plan: Plan, config_path: str) -> str:
    lines = [f"# check-config {config_path}: the config is valid"] + plan.lines
    lines += ["", "## Still needed from you"] + ([f"- {n}" for n in plan.needs] or ["- nothing"])
    verdict = "does not fit: " + "; ".join(plan.problems) if plan.problems else "fits"
    return "\n".join(lines + ["", f"## Verdict: the plan {verdict}"])
