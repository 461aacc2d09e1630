"""A device check of reward-model training on one GPU: DDP and FSDP, bf16, a ~0.8B random Llama.

Run from the repository root on the GPU machine (`bash scripts/gpu_check.sh`, about 3-5 minutes on an
H200 with the defaults), or `python3 scripts/gpu_check.py --cpu` here for a dry run of the same code path
on a tiny model with gloo (20-40 s on 2 busy cores; bf16 on a CPU is slow). Nothing is downloaded and nothing outside torch, transformers and
tokenizers is needed (`--forbid-imports` proves it): the model is a random `LlamaForSequenceClassification`
built on the device, the tokenizer is the tiny Llama's byte-level BPE (`music_assets.devtools.tiny_llama`),
trained here in a second, and the data are synthetic but learnable preference pairs.

The pairs: a long user turn of corpus sentences (longer than `max_length`, so the encoder left-truncates it
and every sequence is `max_length` tokens, the length the memory plan assumes), then a reply that starts with
one of GOOD's openers in the chosen answer and one of BAD's in the rejected one; the rest of the reply is the
same. The reward is read at the last token, ~15 tokens after the opener, so learning the rule takes attention
(a 28M-parameter Llama at lr 1e-4 reaches loss < 0.1 in 10 steps of 16 pairs x 128 tokens).

Per strategy (a fresh model each, with the same seed): train `--steps` steps with
`music_assets.training.trainer.train(..., strategy=...)` in one process (torch.distributed initialised with
world size 1: NCCL on the GPU, gloo on the CPU), then check that the loss fell (mean of the last quarter of the
logged losses below that of the first), that the parameters (DTensors under FSDP) and a scored batch's logits
are on the device, that FSDP really sharded (and DDP did not), that the memory plan counts the model's
parameters exactly, and (GPU) that the held-out accuracy reaches `--min-accuracy`. It prints samples/s and the
peak allocated memory next to the plan of `music_assets.training.memory_plan` for the same setup, then a
summary table.

Then (unless `--no-prefix`) prefix sharing on the device (`run_prefix_check`, a fresh `small` model; `tiny` with
`--cpu`): packed pairs (`training/prefix_packing`, which attends through FlexAttention on CUDA and through the
blocks kernel on a CPU) against each side encoded whole, in fp32 without TF32: one micro-batch's BT loss and every
gradient, and the held-out rewards of `packed_prefix_scores`, within 1e-4; then a training step and held-out
scoring timed both ways (bf16 autocast on the GPU), ratios printed. The DDP and FSDP runs above already train
packed (`prefix_sharing: auto`; these pairs share ~97% of their tokens). Exit status: 0 when every check passed,
1 otherwise.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Model dimensions (Llama, grouped-query attention). `base`: 821M parameters with the 32000-token vocabulary,
# ~0.5 s a step of 32 pairs x 512 tokens on an H200. `tiny` is the tiny Llama's shape, for the CPU dry run.
SIZES = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2),
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=8, vocab_size=32000),
    "base": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                 num_key_value_heads=8, vocab_size=32000),
    "large": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=32, num_attention_heads=16,
                  num_key_value_heads=8, vocab_size=32000),
}
# Training recipes: pairs per step, pairs per forward pass (2 micro-batches: accumulation and DDP's no_sync
# run too), tokens per sequence, peak learning rate.
RECIPES = {
    "gpu": dict(batch_size=32, micro_batch_size=8, max_length=512, learning_rate=1e-4),
    "cpu": dict(batch_size=8, micro_batch_size=4, max_length=64, learning_rate=1e-3),
}
GOOD = ("Sure,", "Of course,", "Yes,", "Great question:")
BAD = ("No,", "Sorry,", "Hmm,", "Well,")
NOT_NEEDED = ("dagster", "duckdb", "polars", "vllm", "pydantic")  # absent on the GPU machine


# --- the import guard ----------------------------------------------------------------------------------------


class ImportGuard:
    """A meta-path finder that makes `import NAME` (and its submodules) fail for the names given, as if they
    were not installed, and remembers who asked: the chain of modules being imported at that moment. A probe
    (`importlib.util.find_spec`, how libraries test for optional packages) is only noted: a finder cannot make
    it answer None, and raising there would break the prober, which on a machine without the package goes on."""

    def __init__(self, names):
        self.names = frozenset(names)
        self.attempts: list[str] = []

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] not in self.names:
            return None
        chain = self.importers()
        if sys._getframe(2).f_globals.get("__name__") == "importlib.util":
            self.attempts.append(f"{name} probed (allowed) <- {chain}")
            return None
        self.attempts.append(f"{name} <- {chain}")
        raise ModuleNotFoundError(f"No module named {name!r} (blocked by gpu_check --forbid-imports; "
                                  f"imported by {chain})", name=name)

    @staticmethod
    def importers() -> str:
        """'a -> b -> c.f': the modules whose top level is running (outermost first), and the function that
        imports if the import is inside one."""
        chain, frame = [], sys._getframe(2)
        innermost = True
        while frame is not None:
            module = frame.f_globals.get("__name__", "?")
            if not module.startswith(("importlib", "_frozen_importlib")):
                if frame.f_code.co_name == "<module>":
                    chain.append(module)
                elif innermost:
                    chain.append(f"{module}.{frame.f_code.co_name}()")
                innermost = False
            frame = frame.f_back
        return " -> ".join(reversed(chain)) or "?"


# --- data ----------------------------------------------------------------------------------------------------


def make_pairs(encoder, n: int, max_length: int, seed: int) -> list:
    """`n` encoded pairs: chosen replies open with a GOOD word, rejected ones with a BAD one, same body."""
    from music_assets.devtools.tiny_llama import _tiny_corpus

    sentences = [line.split("\n", 1)[1] for line in _tiny_corpus()]
    rng = random.Random(seed)
    per_context = max_length // 10 + 4  # ~14 tokens a sentence: always longer than max_length
    pairs = []
    for i in range(n):
        context = [{"role": "user", "content": " ".join(rng.choices(sentences, k=per_context))}]
        body = rng.choice(sentences)
        body = body[0].lower() + body[1:]
        chosen = context + [{"role": "assistant", "content": f"{rng.choice(GOOD)} {body}"}]
        rejected = context + [{"role": "assistant", "content": f"{rng.choice(BAD)} {body}"}]
        pairs.append(encoder.encode(chosen, rejected, f"{seed}-{i}"))
    return pairs


# --- one strategy ------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    strategy: str
    steps: int | None = None
    samples_per_second: float | None = None
    peak_gib: float | None = None
    plan_gib: float | None = None
    losses: list[float] = field(default_factory=list)
    accuracy: float | None = None
    device: str = "-"
    failures: list[str] = field(default_factory=list)


def build_model(size: str, tok, max_length: int, device, seed: int):
    """A random reward model on `device` in float32 (bf16 training keeps fp32 weights)."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    dims = {"vocab_size": len(tok), **SIZES[size]}
    config = LlamaConfig(**dims, max_position_embeddings=max(2048, max_length), num_labels=1,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    with torch.device(device):
        return LlamaForSequenceClassification(config)


def memory_plan(model, cfg, strategy: str, device) -> tuple[object | None, str | None]:
    """(`plan_memory`'s plan for this launch, None) or (None, why there is none)."""
    import torch

    try:
        from music_assets.training.config import TrainingConfig
        from music_assets.training.memory_plan import plan_memory
    except ImportError as exc:
        return None, f"music_assets.training.memory_plan cannot be imported here: {exc}"
    try:
        training = TrainingConfig(options=cfg, processes=1, strategy=strategy)
    except TypeError as exc:
        return None, f"TrainingConfig does not take strategy: {exc}"
    cuda = device.type == "cuda"
    capacity = torch.cuda.get_device_properties(device).total_memory / 2**30 if cuda else 0.0
    bf16 = torch.cuda.is_bf16_supported() if cuda else True
    return plan_memory(model.config, cfg, training, capacity, bf16_supported=bf16), None


def run_strategy(strategy: str, args, tok, train_pairs, heldout, device) -> Outcome:
    import torch
    from torch.distributed.tensor import DTensor

    from music_assets.training.config import TrainConfig
    from music_assets.training.trainer import accuracy, pairwise_scores, rewards, train

    out = Outcome(strategy)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    recipe = RECIPES["cpu" if args.cpu else "gpu"]
    options = dict(backbone=f"gpu-check:random-llama-{args.size}", chat_template=None, precision=args.precision,
                   max_steps=args.steps, eval_every=0, log_every=max(1, args.steps // 20), seed=args.seed,
                   select="last", **recipe)
    cfg = TrainConfig(**options)
    model = build_model(args.size, tok, cfg.max_length, device, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    plan, why_no_plan = memory_plan(model, cfg, strategy, device)
    if plan is None:
        out.failures.append(why_no_plan)
    else:
        out.plan_gib = plan.total / 2**30
        if plan.shape.parameters != n_params:
            out.failures.append(f"memory plan counts {plan.shape.parameters:,} parameters, the model has {n_params:,}")
    print(f"[{strategy}] {n_params / 1e6:.0f}M parameters, {cfg.batch_size} pairs x {cfg.max_length} tokens a step "
          f"in micro-batches of {cfg.micro_batch_size}, {cfg.precision}, {args.steps} steps", flush=True)

    def log(record):
        print(f"[{strategy}] step {record['step']:>4}  loss {record.get('loss', float('nan')):.4f}  "
              f"train acc {record.get('train_accuracy', float('nan')):.3f}  "
              f"{record.get('samples_per_second', 0.0):.1f} pairs/s", flush=True)

    # No validation pairs: the peak is training's own; held-out pairs are scored below.
    result = train(model, train_pairs, [], cfg, tok.pad_token_id, log=log, strategy=strategy)
    if cuda:
        torch.cuda.synchronize(device)
        out.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    out.steps, out.samples_per_second = result.steps, result.samples_per_second
    out.losses = [r["loss"] for r in result.history if "loss" in r]
    if result.steps != args.steps:
        out.failures.append(f"trained {result.steps} steps, asked for {args.steps}")
    k = max(1, len(out.losses) // 4)
    if len(out.losses) < 2:
        out.failures.append(f"only {len(out.losses)} logged losses: cannot tell whether the loss fell")
    elif not sum(out.losses[-k:]) / k < sum(out.losses[:k]) / k:
        out.failures.append(f"the loss did not fall: first {k} logged {out.losses[:k]}, last {k} {out.losses[-k:]}")

    params = list(model.named_parameters())
    out.device = str(params[0][1].device)
    elsewhere = [name for name, p in params if p.device.type != device.type]
    if elsewhere:
        out.failures.append(f"{len(elsewhere)} parameters not on {device.type}, e.g. {elsewhere[:3]}")
    sharded = sum(isinstance(p, DTensor) for _, p in params)
    if strategy == "fsdp" and sharded != len(params):
        out.failures.append(f"fsdp: {sharded} of {len(params)} parameters are DTensors (fully_shard not applied?)")
    if strategy == "ddp" and sharded:
        out.failures.append(f"ddp: {sharded} parameters are DTensors")
    with torch.no_grad():
        chosen, _ = rewards(model, heldout[:4], tok.pad_token_id)
    if chosen.device.type != device.type:
        out.failures.append(f"a scored batch's logits are on {chosen.device}, not {device.type}")
    out.accuracy = accuracy(pairwise_scores(model, heldout, tok.pad_token_id))
    if args.min_accuracy is not None and out.accuracy < args.min_accuracy:
        out.failures.append(f"held-out accuracy {out.accuracy:.3f} < {args.min_accuracy}")
    del model, result, params, chosen
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        print(f"[{strategy}] allocated after freeing the model: {torch.cuda.memory_allocated(device) / 2**30:.2f} GiB")
    if plan is not None and cuda:
        verdict = "fits" if plan.fits else "does NOT fit"
        print(f"[{strategy}] plan: parameters {plan.parameters / 2**30:.2f} + gradients {plan.gradients / 2**30:.2f} "
              f"+ optimizer {plan.optimizer / 2**30:.2f} + activations {plan.activations / 2**30:.2f} GiB "
              f"= {out.plan_gib:.2f} GiB ({verdict} in {plan.usable / 2**30:.1f} usable); "
              f"measured peak {out.peak_gib:.2f} GiB ({out.peak_gib / out.plan_gib:.0%} of the plan)")
    return out


# --- prefix sharing ----------------------------------------------------------------------------------------


PREFIX_TOLERANCE = 1e-4  # fp32, as tests/training/test_prefix_packing.py holds the CPU kernel to
PREFIX_TIMED_MICRO_BATCHES = 6  # micro-batches of different shapes per timed training pass


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (FlexAttention's kernels and block masks)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def timed(fn, repeats: int, device) -> float:
    """Seconds per call of `fn` after one warm-up call (which compiles FlexAttention's kernels)."""
    import torch

    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def run_prefix_check(args, tok, train_pairs, heldout, device) -> Outcome:
    """Packed pairs against unpacked ones on the device (`prefix_packing`: FlexAttention on CUDA, the
    blocks kernel on a CPU): in fp32 with TF32 off, the BT loss and every parameter's gradient of one
    micro-batch must agree within PREFIX_TOLERANCE, and held-out rewards scored packed
    (`packed_prefix_scores`) must equal full-sequence ones; then the training step (forward and
    backward, bf16 autocast on the GPU) and held-out scoring are timed both ways and the ratios printed
    (not checked: they are measurements)."""
    import torch

    from music_assets.evaluation.prefix_scoring import packed_prefix_scores
    from music_assets.training.config import TrainConfig
    from music_assets.training.prefix_attention import kernel_for
    from music_assets.training.prefix_packing import pack_pairs, packed_pair_rewards
    from music_assets.training.trainer import bt_loss, rewards, sequence_scores, shared_fraction

    out = Outcome("prefix")
    cuda = device.type == "cuda"
    recipe = RECIPES["cpu" if args.cpu else "gpu"]
    size = "tiny" if args.cpu else "small"
    model = build_model(size, tok, recipe["max_length"], device, args.seed)
    kernel = kernel_for(device, model.config, training=True)
    micro = train_pairs[: recipe["micro_batch_size"]]
    print(f"[prefix] {size} Llama, {kernel} kernel, micro-batch of {len(micro)} pairs, shared fraction "
          f"{shared_fraction(micro):.2f}",
          flush=True)
    cfg = TrainConfig(backbone="gpu-check", chat_template=None, max_length=recipe["max_length"])
    pad = tok.pad_token_id
    batch = pack_pairs(micro, pad)

    def loss_and_grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        grads = {n: q.grad.detach().clone() for n, q in model.named_parameters() if q.grad is not None}
        model.zero_grad(set_to_none=True)
        return loss.item(), grads

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        model.train()
        loss_u, grads_u = loss_and_grads(bt_loss(*rewards(model, micro, pad), cfg))
        loss_p, grads_p = loss_and_grads(bt_loss(*packed_pair_rewards(model, batch), cfg))
        worst = max((grads_u[n] - grads_p[n]).abs().max().item() for n in grads_u)
        print(f"[prefix] fp32 loss unpacked {loss_u:.6f} packed {loss_p:.6f}; largest gradient difference {worst:.2e} "
              f"(largest gradient {max(g.abs().max().item() for g in grads_u.values()):.2e})", flush=True)
        if grads_u.keys() != grads_p.keys():
            out.failures.append(f"packed training left {len(grads_u.keys() ^ grads_p.keys())} parameters without a gradient")
        if abs(loss_u - loss_p) > PREFIX_TOLERANCE or worst > PREFIX_TOLERANCE:
            out.failures.append(f"packed vs unpacked: loss difference {abs(loss_u - loss_p):.2e}, gradient {worst:.2e} "
                                f"(tolerance {PREFIX_TOLERANCE})")
        del grads_u, grads_p
        seqs = [[p.chosen, p.rejected] for p in heldout]
        whole = sequence_scores(model, [s for group in seqs for s in group], pad)
        packed = [r for group in packed_prefix_scores(model, seqs, pad) for r in group]
        scoring_worst = max(abs(a - b) for a, b in zip(whole, packed))
        print(f"[prefix] fp32 held-out rewards packed vs whole: largest difference {scoring_worst:.2e}", flush=True)
        if scoring_worst > PREFIX_TOLERANCE:
            out.failures.append(f"packed scoring differs from whole sequences by {scoring_worst:.2e}")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    repeats = 2 if args.cpu else 5
    # several micro-batches, each its own row length, as training meets them: a kernel that recompiles
    # for every new shape shows up here (and in the count of graphs compiled while timing), not on one batch
    m = recipe["micro_batch_size"]
    micros = [train_pairs[s: s + m] for s in range(0, min(len(train_pairs), PREFIX_TIMED_MICRO_BATCHES * m), m)]
    packed_micros = [pack_pairs(mb, pad) for mb in micros]

    def steps(packed: bool):
        for mb, rows in zip(micros, packed_micros):
            with autocast:
                pair = packed_pair_rewards(model, rows) if packed else rewards(model, mb, pad)
                loss = bt_loss(*pair, cfg)
            loss.backward()
            model.zero_grad(set_to_none=True)

    def score(packed: bool):
        with torch.no_grad(), autocast:
            return (packed_prefix_scores(model, seqs, pad) if packed
                    else sequence_scores(model, [s for group in seqs for s in group], pad))

    steps(False), steps(True), score(False), score(True)  # every shape seen once: what compiles, compiles here
    graphs = compiled_graphs()
    train_s = {name: timed(lambda packed=packed: steps(packed), repeats, device) / len(micros)
               for name, packed in (("unpacked", False), ("packed", True))}
    model.eval()
    score_s = {name: timed(lambda packed=packed: score(packed), repeats, device)
               for name, packed in (("full", False), ("packed", True))}
    out.samples_per_second = m / train_s["packed"]
    widths = sorted(rows.input_ids.shape[1] for rows in packed_micros)
    print(f"[prefix] training step ({len(micros)} micro-batches of {m} pairs, packed rows of {widths[0]}-{widths[-1]} "
          f"tokens): unpacked {train_s['unpacked'] * 1e3:.1f} ms, packed {train_s['packed'] * 1e3:.1f} ms per "
          f"micro-batch -> packed {train_s['unpacked'] / train_s['packed']:.2f}x; held-out scoring ({len(seqs)} pairs): "
          f"full {score_s['full'] * 1e3:.1f} ms, packed {score_s['packed'] * 1e3:.1f} ms "
          f"-> {score_s['full'] / score_s['packed']:.2f}x; graphs compiled after the warm-up passes: "
          f"{compiled_graphs() - graphs}", flush=True)
    out.device = str(next(model.parameters()).device)
    return out


# --- the whole check -------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="dry run on the CPU with gloo and the tiny model")
    p.add_argument("--steps", type=int, help="optimizer steps per strategy (default: 100 on GPU, 8 with --cpu)")
    p.add_argument("--size", choices=SIZES, help="model size (default: base on GPU, tiny with --cpu)")
    p.add_argument("--strategies", default="ddp,fsdp", help="comma-separated, in order (default: ddp,fsdp)")
    p.add_argument("--precision", default="bf16", choices=("bf16", "bf16-pure", "fp32"))
    p.add_argument("--min-accuracy", type=float,
                   help="held-out accuracy each strategy must reach (default: 0.9 on GPU, none with --cpu)")
    p.add_argument("--train-pairs", type=int, help="distinct training pairs, cycled (default: 1024, 64 with --cpu)")
    p.add_argument("--heldout-pairs", type=int, help="pairs scored after training (default: 128, 32 with --cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-prefix", action="store_true", help="skip the prefix-sharing check (packed vs unpacked)")
    p.add_argument("--forbid-imports", default="",
                   help=f"comma-separated modules to make unimportable first (e.g. {','.join(NOT_NEEDED)})")
    args = p.parse_args(argv)
    args.steps = args.steps or (8 if args.cpu else 100)
    args.size = args.size or ("tiny" if args.cpu else "base")
    args.train_pairs = args.train_pairs or (64 if args.cpu else 1024)
    args.heldout_pairs = args.heldout_pairs or (32 if args.cpu else 128)
    if args.min_accuracy is None and not args.cpu:
        args.min_accuracy = 0.9
    return args


def init_single_process(cuda: bool) -> None:
    """torch.distributed with one rank, as torchrun would set it up: NCCL on cuda:0, gloo on the CPU."""
    import torch

    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if cuda:
        torch.cuda.set_device(0)
        torch.distributed.init_process_group("nccl", device_id=torch.device("cuda", 0))
    else:
        torch.distributed.init_process_group("gloo")


def guarded(strategy: str, *args) -> Outcome:
    """`run_strategy` (or `run_prefix_check` for `prefix`), but an exception (an OOM, a collective that fails) becomes that strategy's failure, so
    that the next strategy still runs and the summary still prints: device time is scarce."""
    import torch

    try:
        return run_prefix_check(*args) if strategy == "prefix" else run_strategy(strategy, *args)
    except Exception as exc:  # reported, and the exit status says it failed
        traceback.print_exc()
        return Outcome(strategy, failures=[f"raised {type(exc).__name__}: {str(exc)[:300]}"])
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def summary(outcomes: list[Outcome]) -> str:
    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    head = (f"{'strategy':<9}{'steps':>6}{'samples/s':>11}{'peak GiB':>10}{'plan GiB':>10}  {'loss first->last':<18}"
            f"{'held-out acc':>13}  {'device':<8}result")
    rows = [head, "-" * len(head)]
    for o in outcomes:
        loss = f"{o.losses[0]:.3f}->{o.losses[-1]:.3f}" if o.losses else "-"
        rows.append(f"{o.strategy:<9}{num(o.steps, 'd'):>6}{num(o.samples_per_second, '.1f'):>11}"
                    f"{num(o.peak_gib, '.2f'):>10}{num(o.plan_gib, '.2f'):>10}  {loss:<18}"
                    f"{num(o.accuracy, '.3f'):>13}  {o.device:<8}{'FAIL' if o.failures else 'ok'}")
    rows += [f"FAIL {o.strategy}: {failure}" for o in outcomes for failure in o.failures]
    return "\n".join(rows)


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    guard = None
    if args.forbid_imports:
        guard = ImportGuard(name.strip() for name in args.forbid_imports.split(",") if name.strip())
        sys.meta_path.insert(0, guard)
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    import transformers

    try:
        from music_assets.devtools.tiny_llama import _train_tiny_tokenizer
        from music_assets.training.rm_data import PairEncoder
    except ImportError as exc:
        print(f"FAIL import closure: {exc}", flush=True)
        return 1
    cuda = not args.cpu
    if cuda and not torch.cuda.is_available():
        print("FAIL: no CUDA device (use --cpu for the dry run)")
        return 1
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    where = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"gpu_check: torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
          f"{where}", flush=True)

    init_single_process(cuda)
    try:
        tok = _train_tiny_tokenizer()
        max_length = RECIPES["cpu" if args.cpu else "gpu"]["max_length"]
        encoder = PairEncoder(tok, max_length)
        train_pairs = make_pairs(encoder, args.train_pairs, max_length, args.seed)
        heldout = make_pairs(encoder, args.heldout_pairs, max_length, args.seed + 1)
        full = sum(p.length == max_length for p in train_pairs) / len(train_pairs)
        print(f"data: {len(train_pairs)} training and {len(heldout)} held-out pairs, {full:.0%} of them "
              f"{max_length} tokens long ({time.perf_counter() - started:.0f} s since start)", flush=True)
        checks = [s.strip() for s in args.strategies.split(",") if s.strip()] + ([] if args.no_prefix else ["prefix"])
        outcomes = [guarded(check, args, tok, train_pairs, heldout, device) for check in checks]
    finally:
        torch.distributed.destroy_process_group()

    print()
    print(summary(outcomes))
    if guard is not None:
        blocked = "; ".join(guard.attempts) or "none attempted"
        print(f"import guard ({', '.join(sorted(guard.names))}): {blocked}")
    print(f"gpu_check took {time.perf_counter() - started:.0f} s")
    return 0 if not any(o.failures for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
