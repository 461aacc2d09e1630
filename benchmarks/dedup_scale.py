"""Dedup at scale: our pipeline on 100k and 1M synthetic pairs vs a datasketch MinHashLSH loop.

Synthetic pairs (prompt, chosen answer, rejected answer; ~150 words of Zipf-distributed pseudo
words) with planted duplicates of known ground truth: 4% exact copies (case, punctuation and
spacing changed) and 4% near copies (one word in 30-60 of the answers replaced; the true
word-5-shingle Jaccard is computed here with plain Python sets and only copies >= the threshold
count as planted near-duplicates). Each measurement runs in its own child process, which reports
its peak RSS.

Prints, for each size: pairs/s, peak RSS, recall and precision (exact and near); for 100k the
same for `datasketch.MinHashLSH` (insert-and-query, 128 permutations, same threshold) on the
same pairs, and the throughput ratio (target >= 3x), plus the 100k -> 1M cost growth.

    .venv/bin/python benchmarks/dedup_scale.py [--sizes 100000 1000000] [--workdir /tmp/dedup-bench]
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

THRESHOLD = 0.8
EXACT_SHARE, NEAR_SHARE = 0.04, 0.04


# --- synthetic data with ground truth --------------------------------------------------------------


def _vocab(rng, n=30_000):
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lengths = rng.integers(3, 10, n)
    return np.array(["".join(rng.choice(letters, k)) for k in lengths])


def _words(text: str) -> list[str]:
    return re.findall(r"[^\W_]+", text.lower())


def _shingles(text: str) -> set[str]:
    ws = _words(text)
    return {" ".join(ws[i : i + 5]) for i in range(len(ws) - 4)} if len(ws) >= 5 else {" ".join(ws)}


def _pair_text(p, c, r):
    return " ".join([p, c, p, r])  # chosen then rejected conversation, as dedup renders them


def generate(n: int, path: Path, seed: int = 0) -> None:
    """Writes `pairs` (pair_id, priority, chosen, rejected, family, kind) into a DuckDB file."""
    import duckdb

    rng = np.random.default_rng(seed)
    vocab = _vocab(rng)
    con = duckdb.connect(str(path))
    con.execute("CREATE OR REPLACE TABLE pairs (pair_id VARCHAR, priority BIGINT, chosen STRUCT(role VARCHAR, content VARCHAR)[], "
                "rejected STRUCT(role VARCHAR, content VARCHAR)[], family BIGINT, kind VARCHAR, jaccard DOUBLE)")
    chunk = 100_000
    bases: list[tuple[str, str, str]] = []
    for start in range(0, n, chunk):
        rows = {k: [] for k in ("pair_id", "priority", "p", "c", "r", "family", "kind", "jaccard")}
        for i in range(start, min(n, start + chunk)):
            u = rng.random()
            if bases and u < EXACT_SHARE:
                fam = int(rng.integers(len(bases)))
                p, c, r = bases[fam]
                p, c, r = p.upper() + " ?!", "  " + c.replace(" ", "  "), r + "."
                kind, jac = "exact", 1.0
            elif bases and u < EXACT_SHARE + NEAR_SHARE:
                fam = int(rng.integers(len(bases)))
                p, c, r = bases[fam]
                c, r = c.split(), r.split()
                every = int(rng.integers(30, 61))
                for words in (c, r):
                    for j in range(int(rng.integers(0, every)), len(words), every):
                        words[j] = str(rng.choice(vocab))
                c, r = " ".join(c), " ".join(r)
                a, b = _shingles(_pair_text(*bases[fam])), _shingles(_pair_text(p, c, r))
                jac = len(a & b) / len(a | b)
                kind = "near" if jac >= THRESHOLD else "near_below_threshold"
            else:
                ranks = rng.zipf(1.2, int(rng.integers(100, 200))) % len(vocab)
                ws = vocab[ranks]
                a, b = int(rng.integers(10, 30)), int(rng.integers(40, 90))
                p, c, r = " ".join(ws[:a]), " ".join(ws[a:b]), " ".join(ws[b:])
                fam, kind, jac = len(bases), "base", None
                bases.append((p, c, r))
            rows["pair_id"].append(f"p{i:07d}")
            rows["priority"].append(i)
            rows["p"].append(p)
            rows["c"].append(c)
            rows["r"].append(r)
            rows["family"].append(fam)
            rows["kind"].append(kind)
            rows["jaccard"].append(jac)
        df = pl.DataFrame(rows, schema={"pair_id": pl.String, "priority": pl.Int64, "p": pl.String, "c": pl.String,
                                        "r": pl.String, "family": pl.Int64, "kind": pl.String, "jaccard": pl.Float64})
        con.register("chunk", df)
        con.execute("INSERT INTO pairs SELECT pair_id, priority, "
                    "[{'role': 'user', 'content': p}, {'role': 'assistant', 'content': c}], "
                    "[{'role': 'user', 'content': p}, {'role': 'assistant', 'content': r}], family, kind, jaccard FROM chunk")
        con.unregister("chunk")
    con.close()


# --- scoring ---------------------------------------------------------------------------------------


def score(truth: pl.DataFrame, removed: pl.DataFrame) -> dict:
    """Recall per planted kind (a planted copy counts when it is removed as a duplicate of a pair of
    its own family) and precision (removals whose pair and duplicate share a family)."""
    fam = dict(zip(truth["pair_id"].to_list(), truth["family"].to_list()))
    kind = dict(zip(truth["pair_id"].to_list(), truth["kind"].to_list()))
    correct = [fam[p] == fam.get(d) for p, d in zip(removed["pair_id"].to_list(), removed["duplicate_of"].to_list())]
    removed_ok = {p for p, ok in zip(removed["pair_id"].to_list(), correct) if ok}
    out = {"removed": removed.height, "precision": round(sum(correct) / len(correct), 4) if correct else 1.0}
    for k in ("exact", "near"):
        planted = [p for p, x in kind.items() if x == k]
        out[f"recall_{k}"] = round(sum(p in removed_ok for p in planted) / len(planted), 4) if planted else None
        out[f"planted_{k}"] = len(planted)
    return out


# --- children ----------------------------------------------------------------------------------------


def child_ours(db: Path) -> dict:
    import duckdb

    from music_assets.curation.config import CurationConfig
    from music_assets.curation.dedup import deduplicate

    con = duckdb.connect(str(db), read_only=True)
    con.execute("SET memory_limit = '3GB'")
    con.execute(f"SET temp_directory = '{db.parent / 'duckdb_tmp'}'")
    con.execute("CREATE TEMP VIEW dedup_source AS SELECT pair_id, priority, chosen, rejected FROM pairs")
    started = time.perf_counter()
    result = deduplicate(con, None, CurationConfig(near_duplicate_threshold=THRESHOLD))
    seconds = time.perf_counter() - started
    removed = con.execute("SELECT pair_id, duplicate_of FROM dedup_removed").pl()
    truth = con.execute("SELECT pair_id, family, kind FROM pairs").pl()
    return {"pairs": result.input_pairs, "seconds": round(seconds, 2), "pairs_per_s": round(result.input_pairs / seconds),
            "stages": result.as_dict()["seconds"], "candidates": result.candidates, **score(truth, removed)}


def child_datasketch(db: Path) -> dict:
    """The straightforward loop: per pair, build a MinHash of its word 5-shingles, query the LSH
    index; a hit marks a duplicate of the first hit, otherwise insert it."""
    import duckdb
    from datasketch import MinHash, MinHashLSH

    con = duckdb.connect(str(db), read_only=True)
    texts = con.execute("SELECT pair_id, array_to_string(list_transform(chosen || rejected, m -> m.content), ' ') "
                        "FROM pairs ORDER BY priority").fetchall()
    truth = con.execute("SELECT pair_id, family, kind FROM pairs").pl()
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=128)
    removed = {"pair_id": [], "duplicate_of": []}
    started = time.perf_counter()
    for pair_id, text in texts:
        m = MinHash(num_perm=128)
        m.update_batch([s.encode() for s in _shingles(text)])
        hits = lsh.query(m)
        if hits:
            removed["pair_id"].append(pair_id)
            removed["duplicate_of"].append(min(hits))
        else:
            lsh.insert(pair_id, m)
    seconds = time.perf_counter() - started
    return {"pairs": len(texts), "seconds": round(seconds, 2), "pairs_per_s": round(len(texts) / seconds),
            **score(truth, pl.DataFrame(removed, schema={"pair_id": pl.String, "duplicate_of": pl.String}))}


def run_child(kind: str, db: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--db", str(db)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--baseline-size", type=int, default=100_000)
    parser.add_argument("--workdir", default="/tmp/dedup-bench")
    parser.add_argument("--child")
    parser.add_argument("--db")
    args = parser.parse_args()
    if args.child:
        result = {"ours": child_ours, "datasketch": child_datasketch}[args.child](Path(args.db))
        result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        print(json.dumps(result))
        return

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for n in args.sizes:
        db = work / f"pairs_{n}.duckdb"
        if not db.exists():
            started = time.perf_counter()
            generate(n, db)
            print(f"generated {n} pairs in {time.perf_counter() - started:.0f}s -> {db}", flush=True)
        results[("ours", n)] = run_child("ours", db)
        print(f"ours       n={n}: {json.dumps(results[('ours', n)])}", flush=True)
        if n == args.baseline_size:
            results[("datasketch", n)] = run_child("datasketch", db)
            print(f"datasketch n={n}: {json.dumps(results[('datasketch', n)])}", flush=True)

    b = args.baseline_size
    if ("datasketch", b) in results:
        ours, ds = results[("ours", b)], results[("datasketch", b)]
        print(f"throughput ratio ours/datasketch at {b}: {ours['pairs_per_s'] / ds['pairs_per_s']:.1f}x (target >= 3)")
    sizes = sorted(n for kind, n in results if kind == "ours")
    if len(sizes) >= 2:
        small, large = results[("ours", sizes[0])], results[("ours", sizes[-1])]
        growth = large["seconds"] / small["seconds"]
        print(f"cost growth {sizes[0]} -> {sizes[-1]} ({sizes[-1] / sizes[0]:.0f}x data): {growth:.1f}x time; "
              f"peak RSS {small['peak_rss_mib']} -> {large['peak_rss_mib']} MiB (target <= 8192 at 1M)")


if __name__ == "__main__":
    main()
