"""Prefix-shared reward scoring vs full-sequence batched scoring, per group, on a decoder backbone.

Same model (SmolLM2-135M with a fresh reward head, fp32), same random token sequences. Each case
scores a few groups that share a prefix: Best-of-N (N candidates after one conversation) and pairs
with a given share of their tokens in common. It prints seconds per group for
`trainer.sequence_scores` (every sequence from its first token, length-sorted batches of the device's
default size) and `prefix_scoring.shared_prefix_scores` (the prefix once, the suffixes against its
cache), their ratio, and the largest reward difference (must stay <= 1e-4). The short-prefix pair
cases show where sharing stops paying: the ideal ratio is (k * (P + S)) / (P + k * S) token for token.

Timed in CPU seconds of this process (`time.process_time`) on `--threads` threads (default 1): on a
machine shared with other jobs, wall time measures the neighbours' load, CPU time the work done.

    .venv/bin/python benchmarks/prefix_scoring.py [--backbone smollm2|tiny-llama] [--repeats 1] [--threads 1]
"""

import argparse
import random
import time

import torch

# (name, candidates per group, prefix tokens, suffix tokens, groups per measurement)
CASES = [
    ("best-of-8, prefix 600", 8, 600, 80, 1),
    ("pair 400 tokens, prefix 0.2", 2, 80, 320, 2),
    ("pair 400 tokens, prefix 0.5", 2, 200, 200, 2),
    ("pair 400 tokens, prefix 0.8", 2, 320, 80, 2),
    ("pair, prefix 16 + 100", 2, 16, 100, 2),
    ("pair, prefix 48 + 100", 2, 48, 100, 2),
]


def main():
    from music_assets.evaluation.prefix_scoring import shared_prefix_scores
    from music_assets.training.train_rm import load_backbone
    from music_assets.training.trainer import sequence_scores

    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", choices=["smollm2", "tiny-llama"], default="smollm2")
    parser.add_argument("--repeats", type=int, default=1, help="best of this many timings per method")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_backbone(f"builtin:{args.backbone}", 0)
    model.eval()
    rng = random.Random(0)
    vocab = [t for t in range(10, len(tok)) if t != tok.pad_token_id]
    print(f"{args.backbone} fp32, torch threads {torch.get_num_threads()}; CPU seconds per group, best of {args.repeats}")
    print(f"{'case':32} {'full s':>8} {'shared s':>9} {'speed-up':>9} {'ideal':>6} {'max diff':>9}")
    for name, k, prefix_len, suffix_len, n_groups in CASES:
        groups = []
        for _ in range(n_groups):
            prefix = rng.choices(vocab, k=prefix_len)
            groups.append([prefix + rng.choices(vocab, k=suffix_len) for _ in range(k)])
        flat = [s for g in groups for s in g]
        t_full, full = _best_time(args.repeats, sequence_scores, model, flat, tok.pad_token_id)
        t_shared, shared = _best_time(args.repeats, shared_prefix_scores, model, groups, tok.pad_token_id)
        diff = max(abs(a - b) for a, b in zip(full, [v for g in shared for v in g]))
        ideal = k * (prefix_len + suffix_len) / (prefix_len + k * suffix_len)
        print(f"{name:32} {t_full / n_groups:8.3f} {t_shared / n_groups:9.3f} {t_full / t_shared:8.2f}x "
              f"{ideal:5.2f}x {diff:9.1e}")


def _best_time(repeats: int, fn, *args):
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.process_time()
        result = fn(*args)
        best = min(best, time.process_time() - started)
    return best, result


if __name__ == "__main__":
    main()
