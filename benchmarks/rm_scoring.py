"""Reward scoring speed: batched, length-sorted `pairwise_scores` vs one pair per forward pass.

Same checkpoint (a freshly initialised reward head on the chosen backbone unless --checkpoint is
given), same HH-RLHF test pairs. Prints pairs/s of both, the speed-up (target >= 4x on CPU) and
the largest score difference (target <= 1e-4).

It also prints the bound on any speed-up that keeps the scores: the matrix-multiply FLOPs of
one-pair scoring (counted by torch's FlopCounterMode) over its time give the FLOP rate it already
reaches; a large fp32 GEMM gives the best rate this machine reaches at all. Batching does the
same FLOPs (fewer, with less padding), so it cannot beat one-pair scoring by more than their ratio.

    .venv/bin/python benchmarks/rm_scoring.py [--backbone minilm|smollm2] [--checkpoint FOLDER] [--pairs 230]
"""

import argparse
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parent.parent


def main():
    from music_assets.seeds.ingest import ingest
    from music_assets.training.rm_data import PairEncoder
    from music_assets.training.train_rm import load_backbone
    from music_assets.training.trainer import pairwise_scores, rewards
    from music_assets.seeds.reader import ResolvedSource

    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint")
    parser.add_argument("--backbone", choices=["minilm", "smollm2"], default="minilm")
    parser.add_argument("--pairs", type=int, default=230)
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()
    if args.checkpoint:
        from music_assets.evaluation.scorers import load_checkpoint

        model, tok, enc = load_checkpoint(args.checkpoint)
    else:
        model, tok = load_backbone(f"builtin:{args.backbone}", 0)
        enc = PairEncoder(tok, args.max_length, "plain" if args.backbone == "minilm" else None)
    path = REPO / "tests" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    rows = ingest(ResolvedSource("hh", str(path), "hh_rlhf", path=path)).pairs[: args.pairs]
    pairs = [enc.encode(r["chosen"], r["rejected"]) for r in rows]
    model.eval()

    started = time.perf_counter()
    batched = pairwise_scores(model, pairs, tok.pad_token_id)  # the device's default batch
    t_batched = time.perf_counter() - started

    started = time.perf_counter()
    single = []
    with torch.no_grad():
        for p in pairs:
            c, r = rewards(model, [p], tok.pad_token_id)
            single.append((c.item(), r.item()))
    t_single = time.perf_counter() - started

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        for p in pairs:
            rewards(model, [p], tok.pad_token_id)
    single_rate, peak = counter.get_total_flops() / t_single / 1e9, gemm_peak_gflops()

    diff = max(abs(a - b) for x, y in zip(batched, single) for a, b in zip(x, y))
    lengths = sorted(len(x) for p in pairs for x in (p.chosen, p.rejected))
    print(f"{args.backbone}, {len(pairs)} pairs, tokens per sequence: median {lengths[len(lengths) // 2]}, max {lengths[-1]}; "
          f"torch threads {torch.get_num_threads()}")
    print(f"batched, length-sorted, inference_mode: {len(pairs) / t_batched:.1f} pairs/s ({t_batched:.1f}s)")
    print(f"one pair per forward:                   {len(pairs) / t_single:.1f} pairs/s ({t_single:.1f}s)")
    print(f"speed-up {t_single / t_batched:.2f}x (target >= 4); max score difference {diff:.2e} (target <= 1e-4)")
    print(f"one pair per forward runs matmuls at {single_rate:.0f} GFLOP/s; this machine's fp32 GEMM peak "
          f"(best of 1024-4096 square matmuls) is {peak:.0f} GFLOP/s: any schedule of the same FLOPs is at most "
          f"{peak / single_rate:.2f}x faster than one pair per forward")


def gemm_peak_gflops(sizes=(1024, 2048, 4096)) -> float:
    """The best fp32 matmul rate torch reaches on this machine: large square GEMMs, best size."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b  # warm-up
        repeats = max(2, int(8e9 / (2 * n**3)))
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - started) / 1e9)
    return best


if __name__ == "__main__":
    main()
