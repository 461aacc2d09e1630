"""Bradley-Terry reward-model training in plain torch: one process, or several under torchrun with
DDP (a full replica per process) or FSDP2 (`fully_shard` per decoder layer and at the root).

Why plain torch rather than transformers' Trainer / TRL: the loop is ~150 lines, every step is
visible (the BT loss, accumulation, clipping, length grouping, resumable state), it runs the same
under `torchrun` with gloo on CPU or NCCL on GPUs, and it avoids a Trainer's per-step overhead
(`benchmarks/rm_training.py` compares it with TRL's RewardTrainer on the same data).

Loss per pair: -log sigmoid(r_chosen - r_rejected - margin), plus `center_rewards_coefficient`
* mean((r_chosen + r_rejected)^2), the reward-centering term TRL offers.
Batches: `batch_size` pairs per optimizer step in all; each of `world` processes takes an equal
slice and runs it in micro-batches of `micro_batch_size` (gradient accumulation), so a step means
the same thing for 1 or N processes, and N-process training matches 1-process training.

Precision: `fp32`; `bf16`, mixed (fp32 weights and optimizer state; bf16 compute through autocast
under DDP, through FSDP2's `MixedPrecisionPolicy` under FSDP, with fp32 gradient reduction);
`bf16-pure` (the weights, gradients and AdamW state themselves in bf16: half the memory).
Checkpoint selection (`select`): `last` ends on the final weights (a fixed-step recipe means
that); `best` ends on the weights of the best validation pass, which are kept on disk (rank 0
writes the full state dict when a pass wins), never as a second copy in memory. Resumable state:
one file for a replicated model; under FSDP each rank saves its shards through
`torch.distributed.checkpoint`, next to a small file with the schedule, RNG and history.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import os
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from music_assets.training.config import TrainConfig
from music_assets.training.prefix_attention import kernel_for
from music_assets.training.prefix_packing import packed_rewards, packing_refusal, pair_prefix_length, unwrap
from music_assets.training.rm_data import DataError, EncodedPair


@dataclass
class TrainResult:
    steps: int = 0
    samples_seen: int = 0
    seconds: float = 0.0
    best_validation_accuracy: float | None = None
    stopped_early: bool = False
    resumed_from_step: int = 0
    prefix_sharing: str = "off"  # how pairs were encoded: 'packed' (shared prefix once) or 'off'
    prefix_attention: str | None = None  # packed rows' attention kernel: 'flex' (CUDA) or 'blocks'; None unpacked
    # (r_chosen, r_rejected) of every validation pair under the weights `train` returns, when a validation
    # pass in this process scored exactly those weights (None otherwise: the caller scores them itself)
    final_validation_scores: list[tuple[float, float]] | None = None
    shared_fraction: float = 0.0  # mean share of a pair's tokens in the prefix its sides share
    history: list = field(default_factory=list)  # {"step", "loss", "train_accuracy", "lr", "validation_accuracy"?}

    @property
    def samples_per_second(self) -> float:
        return self.samples_seen / self.seconds if self.seconds else 0.0


# --- batching ------------------------------------------------------------------------------------


def step_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool,
                 groups: list[str] | None = None, micro_batch_size: int = 1) -> list[list[int]]:
    """One epoch of optimizer-step batches (lists of pair indices), deterministic in (seed, epoch).

    The pairs are shuffled in units: one pair each, or with `groups` (a key per pair, "" for none) the
    pairs of one group (a seed conversation: its seed pair and the MUSIC pairs simulated from it), which
    are then laid out so that a unit shares one micro-batch where it fits in one (`fill_micro_batches`),
    and packed training reads what its pairs have in common once. With length grouping, shuffled units
    are sorted by length inside windows of 50 batches, cut into batches, and the batches shuffled:
    similar lengths share a batch, order stays random. Units of one pair give exactly the order of a
    plain per-pair shuffle."""
    rng = random.Random(seed * 1_000_003 + epoch)
    units = conversation_units(groups) if groups is not None else [[i] for i in range(len(lengths))]
    rng.shuffle(units)
    if group_by_length:
        longest = {id(u): max(lengths[i] for i in u) for u in units}
        windows, window, pairs = [], [], 0
        for unit in units:
            window.append(unit)
            pairs += len(unit)
            if pairs >= batch_size * 50:
                windows.append(window)
                window, pairs = [], 0
        units = [u for w in windows + [window] for u in sorted(w, key=lambda u: -longest[id(u)])]
    order = fill_micro_batches(units, micro_batch_size)
    batches = [order[s : s + batch_size] for s in range(0, len(order) - batch_size + 1, batch_size)]
    rng.shuffle(batches)
    return batches


def conversation_units(groups: list[str]) -> list[list[int]]:
    """Pair indices grouped by key, in order of first appearance; a pair whose key is "" is a unit alone."""
    units: dict[str, list[int]] = {}
    for i, key in enumerate(groups):
        units.setdefault(key or f"\0{i}", []).append(i)
    return list(units.values())


# How many not-yet-full micro-batches `fill_micro_batches` offers each unit (first fit among the latest
# ones): bounds its work at O(pairs x this) when units leave gaps no later unit fits.
OPEN_MICRO_BATCHES = 64


def fill_micro_batches(units: list[list[int]], size: int) -> list[int]:
    """The units' pairs in an order whose consecutive runs of `size` (the micro-batches, as `_optimizer_step`
    and `_batch_share` cut them) keep each unit whole where it fits: a unit goes into the first of the
    latest open micro-batches with room for it (first fit), else starts one; a unit larger than `size`
    fills whole micro-batches and its rest is placed like a unit. Full micro-batches come first, in the
    order they were started; the few left part-full follow, run together. Units of one pair keep their order."""
    bins: list[list[int]] = []
    open_bins: list[int] = []
    for unit in units:
        whole = len(unit) - len(unit) % size
        bins.extend(unit[s : s + size] for s in range(0, whole, size))
        rest = unit[whole:]
        if not rest:
            continue
        target = next((b for b in open_bins if len(bins[b]) + len(rest) <= size), None)
        if target is None:
            bins.append(list(rest))
            open_bins.append(len(bins) - 1)
            open_bins = open_bins[-OPEN_MICRO_BATCHES:]
        else:
            bins[target].extend(rest)
        open_bins = [b for b in open_bins if len(bins[b]) < size]
    return [i for b in bins if len(b) == size for i in b] + [i for b in bins if len(b) < size for i in b]


def _pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def rewards(model, pairs: list[EncodedPair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected) for a micro-batch, in one forward pass over both sides."""
    ids, mask = _pad([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    device = next(model.parameters()).device
    scores = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0].float()
    return scores[: len(pairs)], scores[len(pairs) :]


def bt_loss(chosen: torch.Tensor, rejected: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    loss = -F.logsigmoid(chosen - rejected - cfg.margin).mean()
    if cfg.center_rewards_coefficient:
        loss = loss + cfg.center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
    return loss


# Token slots (sequences x the batch's longest) per scoring forward pass, by device. On a CPU small
# batches win, counted in tokens: measured on 2 cores (SmolLM2-135M fp32, 1 thread, real HH pairs of
# 255 tokens a side at max_length 2,048; benchmarks/README.md, "Prefix sharing"), whole sequences
# took 17.0-17.8 CPU s with 1-4 sequences per batch (255-1,020 slots) and 22.7-23.0 with 8, packed
# rows 11.2-12.6 at one row or 1,024 slots, 13.4-14.9 at 2,048, 16.2 at 4,096; the earlier
# short-pair sweep (HH pairs of ~120 tokens: MiniLM best at 8 sequences, SmolLM2 at 4-8) lands on
# the same ~1,000 slots. Past that the activations fall out of cache while the GEMMs gain nothing.
# (The packed-row figures date from when the block kernel fell back to SDPA's math kernel; with the
# flash kernel one packed row of 2,048 tokens costs 1.01-1.03x the same tokens in 2-8 rows, so a
# long row is fine and the budget only bounds padding between rows.) A GPU wants large batches.
CPU_BATCH_TOKENS, GPU_BATCH_TOKENS = 1024, 32768


def length_batches(costs: list[int], budget: int) -> list[list[int]]:
    """Indices of `costs` (a sequence's or packed row's length) sorted by cost and cut into batches of
    at most `budget` token slots (rows x the batch's longest); a row longer than the budget goes alone.
    Sorting keeps the padding small."""
    order = sorted(range(len(costs)), key=costs.__getitem__)
    batches: list[list[int]] = []
    for i in order:  # ascending: the row added is the batch's longest
        if batches and (len(batches[-1]) + 1) * costs[i] <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def batch_budget(device, max_batch_tokens: int | None = None) -> int:
    """`max_batch_tokens`, or the device's default token slots per scoring forward."""
    if max_batch_tokens:
        return max_batch_tokens
    return CPU_BATCH_TOKENS if torch.device(device).type == "cpu" else GPU_BATCH_TOKENS


@torch.inference_mode()
def sequence_scores(model, seqs: list[list[int]], pad_id: int, batch_size: int | None = None,
                    max_batch_tokens: int | None = None) -> list[float]:
    """The reward of every token sequence: length-sorted batches (little padding) of at most
    `batch_size` sequences when given, else of at most `max_batch_tokens` token slots (default by
    device), no autograd bookkeeping; results in the input order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    if batch_size:
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    else:
        batches = length_batches([len(s) for s in seqs], batch_budget(device, max_batch_tokens))
    out = [0.0] * len(seqs)
    for idx in batches:
        ids, mask = _pad([seqs[i] for i in idx], pad_id)
        scores = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0].float()
        for i, v in zip(idx, scores.tolist()):
            out[i] = v
    model.train(was_training)
    return out


def pairwise_scores(model, pairs: list[EncodedPair], pad_id: int, batch_size: int | None = None) -> list[tuple[float, float]]:
    """(r_chosen, r_rejected) for every pair; both sides of all pairs are scored together as
    sequences, so a batch holds sequences of similar length (`batch_size` pairs per batch;
    default: by device, see `sequence_scores`)."""
    flat = sequence_scores(model, [p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id,
                           2 * batch_size if batch_size else None)
    return list(zip(flat[: len(pairs)], flat[len(pairs) :]))


def accuracy(scores: list[tuple[float, float]]) -> float:
    return sum(c > r for c, r in scores) / len(scores) if scores else float("nan")


# --- the loop --------------------------------------------------------------------------------------


def _lr_lambda(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    warmup = int(round(cfg.warmup_ratio * total))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.lr_scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 1 - progress) if cfg.lr_scheduler == "linear" else 0.5 * (1 + math.cos(math.pi * progress))

    return f


@dataclass
class _Parts:
    """What every optimizer step touches, built once by `_setup` (and restored by `_resume`)."""

    model: torch.nn.Module  # the bare model (sharded in place under FSDP): parameters, state dict, validation
    ddp_model: torch.nn.Module  # what the forward pass goes through: DDP's wrapper, or the model itself
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    autocast: torch.autocast
    dist: bool
    fsdp: bool = False
    rewards: Callable = None  # `rewards` or `packed_rewards` (see `_pair_rewards_fn`)


@dataclass
class _Window:
    """Training loss and accuracy summed since the last log line, so a line reports its own steps."""

    loss: float = 0.0
    correct: float = 0.0
    pairs: int = 0
    steps: int = 0

    def flush(self, step: int, lr: float, samples_seen: int, started: float) -> dict:
        """The log record of the steps since the previous one; starts the next window."""
        record = {"step": step, "loss": self.loss / self.steps,
                  "train_accuracy": self.correct / self.pairs if self.pairs else 0.0, "lr": lr,
                  "samples_per_second": samples_seen / (time.perf_counter() - started)}
        self.loss, self.correct, self.pairs, self.steps = 0.0, 0.0, 0, 0
        return record


@dataclass
class _Best:
    """Early-stopping bookkeeping that a saved state carries across a restart (the best accuracy itself
    lives in `TrainResult.best_validation_accuracy`): where the best pass's weights are on disk (with
    `select: best`), and passes since they won."""

    path: Path | None = None
    evals_without_gain: int = 0
    # not saved with the state: the last pass's (step, scores) and the best pass's scores, when they ran in
    # this process (after a resume the best pass may lie in an earlier one)
    last_pass: tuple[int, list] | None = None
    best_scores: list | None = None

    def patience_ran_out(self, cfg: TrainConfig) -> bool:
        """Whether `early_stopping_patience` validation passes in a row failed to beat the best (never if None)."""
        return cfg.early_stopping_patience is not None and self.evals_without_gain >= cfg.early_stopping_patience


def train(
    model,
    train_pairs: list[EncodedPair],
    validation_pairs: list[EncodedPair],
    cfg: TrainConfig,
    pad_id: int,
    state_dir: Path | None = None,
    log: Callable[[dict], None] = lambda m: None,
    stop_after_steps: int | None = None,
    strategy: str = "ddp",
) -> TrainResult:
    """Trains `model` (already on its device) in place: DDP or FSDP2 (`strategy`) when
    torch.distributed is initialised. With `state_dir` and `checkpoint_every`, saves resumable
    state and resumes from it. `stop_after_steps` ends the run early on purpose (tests use it to
    simulate an interruption)."""
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if dist else (0, 1)
    _check_inputs(train_pairs, cfg, world)
    torch.manual_seed(cfg.seed)
    epochs: dict[int, list[list[int]]] = {}  # the current epoch's batches (`_batch_share`)
    per_epoch = len(train_pairs) // cfg.batch_size
    total = cfg.max_steps or max(1, int(per_epoch * cfg.epochs))

    parts = _setup(model, cfg, total, dist, strategy)
    result, best, window = TrainResult(), _Best(), _Window()
    parts.rewards, result.prefix_sharing, result.shared_fraction = _pair_rewards_fn(model, train_pairs, cfg)
    if result.prefix_sharing == "packed":
        inner = unwrap(model)
        result.prefix_attention = kernel_for(next(inner.parameters()).device, inner.config, training=True)
    state_file = state_dir / "training_state.pt" if state_dir else None
    scratch = Path(tempfile.mkdtemp(prefix="rm-best-")) if cfg.select == "best" and not state_dir else None
    best_file = (state_dir or scratch) / "best_weights.pt" if cfg.select == "best" else None
    step = _resume(state_file, cfg, parts, result, best)
    model.train()
    started = time.perf_counter()

    while step < total:
        mine = _batch_share(train_pairs, step, per_epoch, cfg, rank, world, epochs)
        _optimizer_step(parts, [train_pairs[i] for i in mine], cfg, pad_id, window, step)
        step += 1
        result.samples_seen += cfg.batch_size

        record = None
        if step % cfg.log_every == 0 or step == total:
            record = window.flush(step, parts.scheduler.get_last_lr()[0], result.samples_seen, started)
        if validation_pairs and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total):
            acc = _evaluate(parts, validation_pairs, cfg, pad_id, result, best, best_file, rank, step)
            record = {**(record or {"step": step}), "validation_accuracy": acc}
        if record:
            result.history.append(record)
            log(record)
        if state_file and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
            _save_state(state_file, cfg, parts, step, best, result, rank)
        result.stopped_early = best.patience_ran_out(cfg)
        if result.stopped_early or (stop_after_steps is not None and step >= stop_after_steps):
            break

    result.steps, result.seconds = step, time.perf_counter() - started
    finished = result.stopped_early or step >= total
    if best.path is not None and finished:
        load_full_state_dict(parts, best.path, rank)  # select: best, the best validation weights, not the last
        result.final_validation_scores = best.best_scores
    elif best.last_pass and best.last_pass[0] == step:  # the weights returned are the ones the last pass scored
        result.final_validation_scores = best.last_pass[1]
    if scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    return result


# Below this mean share of a side in the shared prefix, `auto` does not pack. Measured
# (benchmarks/prefix_sharing.py (d), SmolLM2-135M fp32, forward + backward of the BT loss on real HH
# pairs cut to a shared fraction, a micro-batch of 2 as one packed row, block attention, CPU seconds):
# packed / unpacked 2.04x at 0.1, 1.99x at 0.2, 2.12x at 0.3, 2.39x at 0.5 (unpacked, all four sides
# pad to the longest; one row pads nothing; with a row per pair, 1.26x-1.50x), so packing pays from
# the lowest fraction measured; below it, it is unmeasured.
AUTO_MIN_SHARED_FRACTION = 0.1


def shared_fraction(pairs: list[EncodedPair]) -> float:
    """Mean share of a pair's longer side that lies in the prefix both sides share (packing saves
    about half of it: the prefix runs once instead of twice)."""
    if not pairs:
        return 0.0
    return sum(pair_prefix_length(p.chosen, p.rejected) / p.length for p in pairs) / len(pairs)


def _pair_rewards_fn(model, pairs: list[EncodedPair], cfg: TrainConfig) -> tuple[Callable, str, float]:
    """How a micro-batch's rewards are computed (`prefix_sharing`): packed pairs (prefix_packing.py:
    same loss and gradients, the shared prefix run once) or each side in full."""
    fraction = shared_fraction(pairs)
    if cfg.prefix_sharing == "off":
        return rewards, "off", fraction
    refusal = packing_refusal(model)
    if cfg.prefix_sharing == "on" and refusal:
        raise DataError(f"training.options.prefix_sharing is on, but this backbone cannot be packed: {refusal}")
    if refusal or (cfg.prefix_sharing == "auto" and fraction < AUTO_MIN_SHARED_FRACTION):
        return rewards, "off", fraction
    return packed_rewards, "packed", fraction


def _check_inputs(train_pairs: list[EncodedPair], cfg: TrainConfig, world: int) -> None:
    """Refuses, before any model work, inputs that cannot make even one full, evenly split step."""
    if not train_pairs:
        raise DataError("the training split is empty: nothing to train on")
    if cfg.batch_size % (world * cfg.micro_batch_size):
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of processes ({world}) x micro_batch_size ({cfg.micro_batch_size})")
    if len(train_pairs) < cfg.batch_size:
        raise DataError(f"the training split has {len(train_pairs)} pairs, fewer than one batch ({cfg.batch_size})")


def _setup(model, cfg: TrainConfig, total: int, dist: bool, strategy: str) -> _Parts:
    """The optimizer (no weight decay on biases and norm weights, the parameters with ndim < 2), the
    warm-up-then-decay schedule over `total` steps, the precision, and the DDP wrapper or the FSDP2
    sharding (the optimizer is built after sharding, so its state is sharded too)."""
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy must be ddp or fsdp, got {strategy!r}")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.precision == "bf16-pure":
        model.to(torch.bfloat16)
    fsdp = dist and strategy == "fsdp"
    device = next(model.parameters()).device
    if fsdp:
        _shard(model, cfg)
        ddp_model = model
    elif dist:  # gradients as views of DDP's buckets: no second copy of them (the memory plan counts one)
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    else:
        ddp_model = model
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, total))
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16" and not fsdp)
    return _Parts(model, ddp_model, optimizer, scheduler, autocast, dist, fsdp)


def _shard(model, cfg: TrainConfig) -> None:
    """FSDP2: each decoder layer (the classes the model names in `_no_split_modules`, as Hugging Face's
    own device maps do) becomes one unit whose parameters are gathered just for its forward and backward,
    then the root (embeddings, final norm, head). Mixed bf16 computes in bf16 and reduces gradients in
    fp32 while the sharded weights and optimizer state stay fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if cfg.precision == "bf16" else MixedPrecisionPolicy())
    unit_classes = set(getattr(model, "_no_split_modules", None) or [])
    for module in [m for m in model.modules() if type(m).__name__ in unit_classes and m is not model]:
        fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def full_state_dict(model) -> dict:
    """The whole model's weights as plain CPU tensors: gathered from the shards under FSDP (on rank 0;
    the other ranks get an empty dict), the state dict itself otherwise. Every rank must call it."""
    if _is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.clone() for k, v in state.items()}  # own storage each (gathered ones may be views)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def load_full_state_dict(parts: _Parts, path: Path, rank: int) -> None:
    """Loads weights written by `full_state_dict` (rank 0 reads the file and, under FSDP, broadcasts
    it into every rank's shards; replicated models each read it)."""
    if parts.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        state = torch.load(path, weights_only=True) if rank == 0 else {}
        set_model_state_dict(parts.model, state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:
        parts.model.load_state_dict(torch.load(path, weights_only=True))


def _is_sharded(model) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


def _resume(state_file: Path | None, cfg: TrainConfig, parts: _Parts, result: TrainResult, best: _Best) -> int:
    """Restores a saved state (weights, optimizer, schedule, RNG, history, best-so-far) and returns its
    step, or 0 without one; a state from another config is refused, as its steps would mean other things."""
    if not (state_file and state_file.exists()):
        return 0
    state = torch.load(state_file, weights_only=False)
    if state["config"] != cfg.fingerprint():
        raise ValueError(f"{state_file} was written by a different training config; delete it to start over")
    if bool(state.get("shards")) != parts.fsdp:
        raise ValueError(f"{state_file} was written {'with' if state.get('shards') else 'without'} FSDP; "
                         "resume with the same strategy, or delete it to start over")
    if parts.fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(parts.model, parts.optimizer)
        shards = {"model": model_state, "optimizer": optim_state}
        dcp.load(shards, checkpoint_id=str(state_file.parent / state["shards"]))
        set_state_dict(parts.model, parts.optimizer, model_state_dict=shards["model"],
                       optim_state_dict=shards["optimizer"])
    else:
        parts.model.load_state_dict(state["model"])
        parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])
    best.path = Path(state["best_path"]) if state["best_path"] else None
    best.evals_without_gain = state["evals_without_gain"]
    result.history, result.best_validation_accuracy = state["history"], state["best"]
    result.resumed_from_step = state["step"]
    return state["step"]


def _batch_share(train_pairs: list[EncodedPair], step: int, per_epoch: int, cfg: TrainConfig, rank: int, world: int,
                 epochs: dict[int, list[list[int]]]) -> list[int]:
    """This process's slice of step `step`'s batch. The batch depends only on (seed, step), so a resumed
    run trains on the same pairs as an uninterrupted one, and N processes on the same pairs as one.
    `epochs` keeps the current epoch's batches (computed once per epoch, not per step)."""
    epoch, index = divmod(step, per_epoch)
    if epoch not in epochs:
        epochs.clear()
        groups = [p.group for p in train_pairs] if cfg.group_by_conversation else None
        epochs[epoch] = step_batches([p.length for p in train_pairs], cfg.batch_size, cfg.seed, epoch,
                                     cfg.group_by_length, groups, cfg.micro_batch_size)
    batch = epochs[epoch][index]
    return batch[rank * (cfg.batch_size // world) : (rank + 1) * (cfg.batch_size // world)]


def _optimizer_step(parts: _Parts, pairs: list[EncodedPair], cfg: TrainConfig, pad_id: int, window: _Window,
                    step: int) -> None:
    """One optimizer step over this process's pairs, in micro-batches: each loss is weighted by its share of
    the pairs, so the accumulated gradient is that of one pass over them; DDP syncs on the last only."""
    micro = [pairs[s : s + cfg.micro_batch_size] for s in range(0, len(pairs), cfg.micro_batch_size)]
    for k, chunk in enumerate(micro):
        sync = k == len(micro) - 1
        # DDP reduces gradients on the last micro-batch only; FSDP reduce-scatters each one into the shards
        ctx = parts.ddp_model.no_sync() if parts.dist and not parts.fsdp and not sync else nullcontext()
        with ctx, parts.autocast:
            c, r = parts.rewards(parts.ddp_model, chunk, pad_id)
            loss = bt_loss(c, r, cfg) * len(chunk) / len(pairs)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {step}: stopping (lower the learning rate?)")
        loss.backward()
        window.loss += loss.item()
        window.correct += (c > r).float().sum().item()
        window.pairs += len(chunk)
    torch.nn.utils.clip_grad_norm_(parts.model.parameters(), cfg.max_grad_norm)
    parts.optimizer.step()
    parts.scheduler.step()
    parts.optimizer.zero_grad(set_to_none=True)
    window.steps += 1


def _evaluate(parts: _Parts, validation_pairs: list[EncodedPair], cfg: TrainConfig, pad_id: int,
              result: TrainResult, best: _Best, best_file: Path | None, rank: int, step: int) -> float:
    """Validation accuracy (every rank scores the same pairs: under FSDP each forward is collective),
    counting passes that did not beat the best, for early stopping; with `select: best`, the winning
    pass's full weights go to `best_file` (rank 0 writes, temp file then rename). The scores are kept
    (`best.last_pass`, `best.best_scores`) so that the caller need not score the returned weights once more."""
    scores = pairwise_scores(parts.model, validation_pairs, pad_id, cfg.micro_batch_size * 2)
    acc, best.last_pass = accuracy(scores), (step, scores)
    if result.best_validation_accuracy is None or acc > result.best_validation_accuracy:
        result.best_validation_accuracy, best.evals_without_gain, best.best_scores = acc, 0, scores
        if best_file is not None:
            state = full_state_dict(parts.model)
            if rank == 0:
                best_file.parent.mkdir(parents=True, exist_ok=True)
                torch.save(state, best_file.with_suffix(".tmp"))
                os.replace(best_file.with_suffix(".tmp"), best_file)
            if parts.dist:
                torch.distributed.barrier()
            best.path = best_file
    else:
        best.evals_without_gain += 1
    return acc


def _save_state(path: Path, cfg: TrainConfig, parts: _Parts, step: int, best: _Best, result: TrainResult,
                rank: int) -> None:
    """The resumable state, atomically: rank 0 writes the state file to a temp name, then renames it (a
    crash mid-write leaves the previous one); under FSDP every rank first saves its shards to a folder
    of their own for this step, which the state file names, and older shard folders go after the rename.
    All ranks then meet at a barrier, so none runs ahead of a state not yet on disk."""
    shards = None
    if parts.fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        shards = f"shards-step-{step}"
        model_state, optim_state = get_state_dict(parts.model, parts.optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(path.parent / shards))
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        weights = {} if parts.fsdp else {"model": parts.model.state_dict(), "optimizer": parts.optimizer.state_dict()}
        torch.save({"config": cfg.fingerprint(), **weights, "shards": shards, "scheduler": parts.scheduler.state_dict(),
                    "rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
                    "step": step, "best_path": str(best.path) if best.path else None,
                    "evals_without_gain": best.evals_without_gain, "history": result.history,
                    "best": result.best_validation_accuracy}, tmp)
        os.replace(tmp, path)
        for old in path.parent.glob("shards-step-*"):
            if old.name != shards:
                shutil.rmtree(old, ignore_errors=True)
    if parts.dist:
        torch.distributed.barrier()
