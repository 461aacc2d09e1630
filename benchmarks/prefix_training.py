"""Prefix-shared training speed: packed pairs (`training/prefix_packing.py`) vs the trainer's unpacked
forward, SmolLM2-135M in fp32, forward + backward of the BT loss (no optimizer step, which is the same
for both).

Pairs of `--length` tokens per side whose shared prefix is a given fraction of it (0.5 and 0.8 by
default). Unpacked, a pair costs 2 x length tokens; packed, length x (1 + (1 - fraction)): at 0.5 a
quarter fewer, at 0.8 40 % fewer, plus less attention. The token ids are seeded random ids (never
the pad id): speed does not depend on what they say. Prints pairs/s for both and their ratio per
fraction, also per CPU second of this process (with one thread, the figure to trust on a machine
other jobs share), and the tokens each forward ran.

    .venv/bin/python benchmarks/prefix_training.py [--length 512] [--fractions 0.5 0.8] [--pairs 1] [--steps 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import random
import time


def make_pairs(vocab: int, pad_id: int, length: int, fraction: float, n: int, seed: int = 0) -> list:
    """`n` EncodedPairs of `length` tokens per side sharing their first round(fraction * length)."""
    from music_assets.training.rm_data import EncodedPair

    rng = random.Random(seed)
    ids = [i for i in range(vocab) if i != pad_id]
    prefix_len = round(fraction * length)
    pairs = []
    for _ in range(n):
        prefix = rng.choices(ids, k=prefix_len)
        chosen, rejected = rng.choices(ids, k=length - prefix_len), rng.choices(ids, k=length - prefix_len)
        if rejected[0] == chosen[0]:  # the sides part right after the prefix
            rejected[0] = ids[(ids.index(chosen[0]) + 1) % len(ids)]
        pairs.append(EncodedPair(prefix + chosen, prefix + rejected))
    return pairs


def pairs_per_second(model, pairs: list, pad_id: int, variants: dict, steps: int) -> dict[str, tuple[float, float]]:
    """(pairs per wall-clock second, pairs per CPU second) of the forward + backward of the BT loss
    over `pairs` (one micro-batch) for each variant (name -> rewards function), after one warm-up
    step each. The variants take turns step by step, so a change in the machine's load falls on all
    alike; CPU seconds (this process's) hardly depend on that load at all."""
    from music_assets.training.trainer import TrainConfig, bt_loss

    cfg = TrainConfig()
    wall, cpu = dict.fromkeys(variants, 0.0), dict.fromkeys(variants, 0.0)
    for step in range(steps + 1):
        for name, rewards_fn in variants.items():
            started, started_cpu = time.perf_counter(), time.process_time()
            bt_loss(*rewards_fn(model, pairs, pad_id), cfg).backward()
            if step:
                wall[name] += time.perf_counter() - started
                cpu[name] += time.process_time() - started_cpu
            model.zero_grad(set_to_none=True)
    return {name: (len(pairs) * steps / wall[name], len(pairs) * steps / cpu[name]) for name in variants}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="builtin:smollm2")
    parser.add_argument("--length", type=int, default=512, help="tokens per side (prefix + suffix)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.8], help="shared-prefix fraction")
    parser.add_argument("--pairs", type=int, default=1, help="pairs per micro-batch")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: steadier figures on a machine that other jobs share)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant (after one warm-up)")
    args = parser.parse_args()

    import torch

    from music_assets.training.prefix_packing import pack_pairs, packed_rewards
    from music_assets.training.train_rm import load_backbone
    from music_assets.training.trainer import rewards

    torch.set_num_threads(args.threads)
    model, tok = load_backbone(args.backbone, 0)
    model.train()
    print(f"{args.backbone} fp32, {model.config._attn_implementation}, {torch.get_num_threads()} threads, "
          f"{args.pairs} pairs per micro-batch, {args.length} tokens per side, {args.steps} timed steps")
    for fraction in args.fractions:
        pairs = make_pairs(len(tok), tok.pad_token_id, args.length, fraction, args.pairs)
        speed = pairs_per_second(model, pairs, tok.pad_token_id, {"unpacked": rewards, "packed": packed_rewards},
                                 args.steps)
        (unpacked, unpacked_cpu), (packed, packed_cpu) = speed["unpacked"], speed["packed"]
        tokens = sum(len(p.chosen) + len(p.rejected) for p in pairs)
        print(f"prefix fraction {fraction:.2f}: pairs/s unpacked {unpacked:.3f}, packed {packed:.3f} "
              f"(ratio {packed / unpacked:.2f}x); per CPU second {unpacked_cpu:.3f} vs {packed_cpu:.3f} "
              f"(ratio {packed_cpu / unpacked_cpu:.2f}x); tokens per forward {tokens} unpacked, "
              f"{pack_pairs(pairs, tok.pad_token_id).real_tokens} packed")

if __name__ == "__main__":
    main()
