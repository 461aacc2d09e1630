"""Dedup and training splits on real data under real Dagster and DuckDB.

Seeds: the UltraFeedback and HH-RLHF slices in tests/data, plus a seed file planted with an
exact copy, a near copy and an MT-Bench leak (MT-Bench registered as an evaluation set), plus
MUSIC pairs written into music_pairs. Expected figures are derived independently in this file
with plain Python (normalized-text sets), not with the code under test.
"""

import json
import re
from collections import Counter

import duckdb
import numpy as np
import polars as pl
import pytest
from dagster import DagsterInstance, materialize

from music_assets.curation.assets import deduplicated_pairs, eval_items, training_splits
from music_assets.curation.config import CurationConfig
from music_assets.curation.dedup import deduplicate
from music_assets.assembly import build_resources
from music_assets.curation.minhash import band_keys, normalize, shingle_hashes, signatures
from music_assets.common.partitions import seed_partitions
from music_assets.seeds.assets import seed_ingestion
from music_assets.common.tables import create_schema, sql
from tests.helpers import load_settings_in


def words(text: str) -> list[str]:
    return re.findall(r"[^\W_]+", text.lower())


def shingles(text: str, w: int = 5) -> set[str]:
    ws = words(text)
    return {" ".join(ws[i : i + w]) for i in range(len(ws) - w + 1)} if len(ws) >= w else {" ".join(ws)}


def pair_text(pair: dict) -> str:
    return " ".join(m["content"] for m in pair["chosen"] + pair["rejected"])


def conv(*turns: str) -> list[dict]:
    return [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]


@pytest.fixture(scope="module")
def built(tmp_path_factory, real_data):
    tmp = tmp_path_factory.mktemp("dedup")
    uf = [json.loads(line) for line in (real_data / "ultrafeedback" / "eval_clean.jsonl").read_text().splitlines()]
    mt = [json.loads(line) for line in (real_data / "mt-bench" / "question.jsonl").read_text().splitlines()]
    first, second = uf[0], uf[1]
    near_answer = second["chosen"].split()
    for i in range(0, len(near_answer), 60):  # one changed word in 60: Jaccard of 5-shingles ~0.85
        near_answer[i] = "CHANGED"
    planted = [
        # 1. exact copy of uf/1 up to case, punctuation and spacing
        {"chosen": conv(first["prompt"].upper() + " !!", first["chosen"]), "rejected": conv(first["prompt"], "  " + first["rejected"])},
        # 2. near copy of uf/2
        {"chosen": conv(second["prompt"], " ".join(near_answer)), "rejected": conv(second["prompt"], second["rejected"])},
        # 3. an MT-Bench question inside a longer request: an evaluation leak
        {"chosen": conv("Hi! " + mt[0]["turns"][0] + " Keep it short.", "Aloha from Hawaii, where ..."),
         "rejected": conv("Hi! " + mt[0]["turns"][0] + " Keep it short.", "I cannot help.")},
        # 4. an ordinary new pair
        {"chosen": conv("Which sorting algorithm is stable and runs in n log n time in the worst case?", "Merge sort."),
         "rejected": conv("Which sorting algorithm is stable and runs in n log n time in the worst case?", "Quicksort.")},
    ]
    planted_path = tmp / "planted.jsonl"
    planted_path.write_text("\n".join(json.dumps(p) for p in planted) + "\n")
    settings = load_settings_in(
        tmp,
        seed_sources={
            "uf": {"path": str(real_data / "ultrafeedback" / "eval_clean.jsonl")},
            "hh": {"path": str(real_data / "hh-rlhf" / "harmless-base-test.jsonl.gz"), "format": "hh_rlhf"},
            "z_planted": {"path": str(planted_path), "format": "conversational"},
        },
        eval_sets={"mt_bench": {"path": str(real_data / "mt-bench" / "question.jsonl"), "format": "prompts"}},
        data={"split_seed": 3},
    )
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(seed_partitions.name, ["uf", "hh", "z_planted"])
    resources = build_resources(settings)
    for key in ("uf", "hh", "z_planted"):
        assert materialize([seed_ingestion], partition_key=key, instance=instance, resources=resources).success

    # MUSIC pairs: one continuing uf/3 (its group), one duplicating seed pair uf/4
    con = duckdb.connect(str(settings.duckdb_path))
    create_schema(con)
    seeds = {r[0]: (r[1], r[2]) for r in con.execute("SELECT pair_id, chosen, rejected FROM music.seed_conversations "
                                                     "WHERE pair_id IN ('uf/3', 'uf/4')").fetchall()}
    music = [
        ("music/a", "uf/3", seeds["uf/3"][0] + conv("Now do it in Python, please, with type hints everywhere.", "def solve(a: float) -> float: ...")[0:2],
         seeds["uf/3"][0] + conv("Now do it in Python, please, with type hints everywhere.", "def solve(a): return a")[0:2]),
        ("music/b", "uf/4", seeds["uf/4"][0], seeds["uf/4"][1]),
    ]
    for pid, seed_id, chosen, rejected in music:
        con.execute(
            "INSERT INTO music.music_pairs VALUES ('uf', $pid, $pid, $seed, 1, 1, 1, $c, $r, 2, 'x', 'y', 'g', 'p', '{}', '{}', 'h')",
            {"pid": pid, "seed": seed_id, "c": chosen, "r": rejected},
        )
    con.close()
    result = materialize([eval_items, deduplicated_pairs, training_splits], instance=instance, resources=resources)
    return settings, result


def test_dedup_removes_planted_and_natural_duplicates(built):
    settings, result = built
    assert result.success
    con = duckdb.connect(str(settings.duckdb_path), read_only=True)
    removed = {r[0]: r[1:] for r in con.execute("SELECT pair_id, rule, duplicate_of, similarity FROM music.dedup_removed").fetchall()}
    assert removed["z_planted/1"][:2] == ("exact", "uf/1")
    assert removed["z_planted/2"][:2] == ("near", "uf/2") and 0.8 <= removed["z_planted/2"][2] < 1
    assert removed["z_planted/3"][:2] == ("eval_leak", "mt_bench/81") and removed["z_planted/3"][2] == 1.0
    assert removed["music/b"][:2] == ("exact", "uf/4")
    assert "z_planted/4" not in removed and "music/a" not in removed

    # exact duplicates among the real seed pairs, derived independently: same normalized word sequence
    seeds = con.execute("SELECT pair_id, chosen, rejected FROM music.seed_conversations WHERE kind = 'pair' "
                        "AND source IN ('hh', 'uf') ORDER BY pair_id").pl().to_dicts()
    first_of: dict[str, str] = {}
    expected_exact = set()
    for p in seeds:
        key = " ".join(words(pair_text(p)))
        if key in first_of:
            expected_exact.add(p["pair_id"])
        else:
            first_of[key] = p["pair_id"]
    got_exact = {k for k, v in removed.items() if v[0] == "exact" and not k.startswith(("z_planted", "music"))}
    assert got_exact == expected_exact
    print(f"real exact duplicates: {len(expected_exact)}; removed: {Counter(v[0] for v in removed.values())}")

    # every near-duplicate removal is a true one (exact Jaccard recomputed here)
    texts = {p["pair_id"]: pair_text(p) for p in seeds}
    for pid, (rule, dup, sim) in removed.items():
        if rule == "near" and pid in texts:
            a, b = shingles(texts[pid]), shingles(texts[dup])
            assert len(a & b) / len(a | b) == pytest.approx(sim, abs=1e-9) and sim >= 0.8

    n_in, kept, n_removed, quarantined = (
        con.execute("SELECT count(*) FROM music.seed_conversations WHERE kind = 'pair'").fetchone()[0] + 2,
        *(con.execute(f"SELECT count(*) FROM music.{t}").fetchone()[0] for t in ("deduplicated_pairs", "dedup_removed", "dedup_quarantine")),
    )
    assert n_in == kept + n_removed + quarantined
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks == {"removal_counts_add_up": True, "no_pair_in_two_splits": True,
                      "no_held_out_or_eval_duplicate_in_train": True}


def test_splits_are_grouped_and_exported(built):
    settings, result = built
    con = duckdb.connect(str(settings.duckdb_path), read_only=True)
    rows = con.execute("SELECT variant, split, pair_id, origin, group_id FROM music.training_splits").pl()
    kept = con.execute("SELECT pair_id, origin, group_id FROM music.deduplicated_pairs").pl()
    baseline = rows.filter(pl.col("variant") == "baseline")
    music = rows.filter(pl.col("variant") == "music")
    assert set(baseline["pair_id"]) == set(kept.filter(pl.col("origin") == "seed")["pair_id"])
    assert set(music["pair_id"]) == set(kept["pair_id"])
    for part in (baseline, music):
        assert part.group_by("group_id").agg(pl.col("split").n_unique())["split"].max() == 1
        assert part["pair_id"].is_unique().all()
    # the MUSIC pair shares its seed conversation's split
    split_of = dict(music.select("pair_id", "split").iter_rows())
    assert split_of["music/a"] == split_of["uf/3"]
    shares = Counter(baseline["split"].to_list())
    assert 0.7 < shares["train"] / baseline.height < 0.9  # 80/10/10 by group

    exports = settings.home / "exports"
    for variant in ("baseline", "music"):
        for split in ("train", "validation", "test"):
            jsonl = [json.loads(line) for line in (exports / variant / f"{split}.jsonl").read_text().splitlines()]
            parquet = pl.read_parquet(exports / variant / f"{split}.parquet")
            expected = rows.filter((pl.col("variant") == variant) & (pl.col("split") == split)).height
            assert len(jsonl) == parquet.height == expected
            assert all(set(m) == {"role", "content"} for r in jsonl[:20] for m in r["chosen"] + r["rejected"])
            # each pair's seed conversation travels with it (training.group_by_conversation batches by it)
            assert dict(parquet.select("pair_id", "group_id").iter_rows()) == dict(
                kept.filter(pl.col("pair_id").is_in(parquet["pair_id"].implode())).select("pair_id", "group_id").iter_rows())
    group_of = dict(kept.select("pair_id", "group_id").iter_rows())
    assert group_of["music/a"] == group_of["uf/3"]
    meta = result.asset_materializations_for_node("training_splits")[0].metadata
    comp = meta["composition"].value
    assert sum(comp["music"]["per_split"]["train"].values()) == music.filter(pl.col("split") == "train").height
    assert comp["music"]["user_turns_histogram"]


def _source(con, rows: list[dict]):
    con.register("src", pl.DataFrame(rows, schema={
        "pair_id": pl.String, "priority": pl.Int64,
        "chosen": pl.List(pl.Struct({"role": pl.String, "content": pl.String})),
        "rejected": pl.List(pl.Struct({"role": pl.String, "content": pl.String})),
    }))
    con.execute("CREATE OR REPLACE TEMP VIEW dedup_source AS SELECT * FROM src")


def test_bad_rows_are_quarantined_with_reasons():
    con = duckdb.connect()
    good = conv("How do I keep basil alive on a windowsill in winter?", "Water it when the soil is dry.")
    _source(con, [
        {"pair_id": "ok", "priority": 0, "chosen": good, "rejected": conv(good[0]["content"], "Never water it.")},
        {"pair_id": None, "priority": 0, "chosen": good, "rejected": good},
        {"pair_id": "  ", "priority": 0, "chosen": good, "rejected": good},
        {"pair_id": "nulls", "priority": 0, "chosen": [{"role": "user", "content": None}], "rejected": good},
        {"pair_id": "punct", "priority": 0, "chosen": conv("?!", "..."), "rejected": conv("?!", "—")},
        {"pair_id": "ok", "priority": 1, "chosen": good, "rejected": good},
    ])
    result = deduplicate(con, None, CurationConfig())
    q = {(r[0], r[1]) for r in con.execute("SELECT pair_id, rule FROM dedup_quarantine").fetchall()}
    assert q == {(None, "missing_id"), ("  ", "missing_id"), ("nulls", "non_string_content"),
                 ("punct", "empty_text"), ("ok", "duplicate_id")}
    assert result.kept == 1 and result.accounted()
    reasons = [r[0] for r in con.execute("SELECT reason FROM dedup_quarantine").fetchall()]
    assert all(reasons)


def test_leak_check_finds_a_train_pair_duplicating_a_test_pair():
    """The split check is not vacuous: plant a near-duplicate across splits and it is reported."""
    con = duckdb.connect()
    create_schema(con)
    rng = np.random.default_rng(1)
    base = " ".join(f"w{i}" for i in rng.integers(0, 3000, 200))
    near = base.replace(base.split()[100], "baker", 1)  # one word of 200: Jaccard ~0.95
    other = " ".join(f"w{i}" for i in rng.integers(0, 3000, 200))
    for pid, split, text in (("t1", "test", base), ("tr1", "train", near), ("tr2", "train", other)):
        c = conv("question " + pid, text)
        con.execute("INSERT INTO music.deduplicated_pairs VALUES ('seed', 's', $p, $p, 1, $c, $c)", {"p": pid, "c": c})
        con.execute("INSERT INTO music.training_splits VALUES ('music', $s, $p, 'seed', 's', $p, 1)", {"p": pid, "s": split})
    con.execute(sql("curation/split_leak_source"))
    deduplicate(con, con.execute(sql("curation/eval_user_messages")).pl(), CurationConfig())
    leaks = con.execute(sql("curation/split_leaks")).fetchall()
    assert [(r[0], r[1], r[3], r[4]) for r in leaks] == [("tr1", "train", "t1", "test")]


def test_one_permutation_signatures_estimate_jaccard():
    """Bins agree at the rate of the true Jaccard similarity; band keys catch pairs above 0.8."""
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(5000)]
    docs = [" ".join(rng.choice(vocab, 300)) for _ in range(100)]
    edited = []
    for d in docs:
        ws = d.split()
        for i in rng.choice(len(ws), 4, replace=False):
            ws[i] = "edit"
        edited.append(" ".join(ws))
    cfg = CurationConfig().shingles()
    texts = pl.Series(docs + edited)
    doc, hashes = shingle_hashes(normalize(texts), cfg)
    sig = signatures(doc, hashes, len(texts), cfg)
    estimate = (sig[:100] == sig[100:]).mean(axis=1)
    truth = np.array([len(shingles(a) & shingles(b)) / len(shingles(a) | shingles(b)) for a, b in zip(docs, edited)])
    assert abs(estimate.mean() - truth.mean()) < 0.02
    assert np.abs(estimate - truth).max() < 0.15
    keys = band_keys(sig, cfg)
    assert (keys[:100] == keys[100:]).any(axis=1).all()  # every edited copy shares a band
    assert not (keys[:50] == keys[50:100]).any()  # unrelated documents share none


def test_music_ratio_caps_music_train_pairs_and_keeps_held_out_ones():
    from music_assets.curation.splits import assign_splits, variants

    rows = [{"origin": "seed", "source": "s", "pair_id": f"s{i}", "group_id": f"g{i}", "user_turns": 1} for i in range(100)]
    rows += [{"origin": "music", "source": "s", "pair_id": f"m{i}", "group_id": f"g{i % 100}", "user_turns": 3}
             for i in range(300)]
    split = assign_splits(pl.DataFrame(rows), seed=5, validation=0.1, test=0.1)
    capped = variants(split, seed=5, music_ratio=0.5)
    music = capped.filter(pl.col("variant") == "music")
    seed_train = music.filter((pl.col("origin") == "seed") & (pl.col("split") == "train")).height
    assert music.filter((pl.col("origin") == "music") & (pl.col("split") == "train")).height == round(0.5 * seed_train)
    held_out = split.filter((pl.col("origin") == "music") & (pl.col("split") != "train")).height
    assert music.filter((pl.col("origin") == "music") & (pl.col("split") != "train")).height == held_out
    assert capped.filter(pl.col("variant") == "baseline")["origin"].unique().to_list() == ["seed"]
    assert variants(split, seed=5, music_ratio=0.5).equals(capped)  # deterministic
    with pytest.raises(ValueError, match="sum to < 1"):
        assign_splits(pl.DataFrame(rows), seed=5, validation=0.5, test=0.5)


def test_an_edited_pair_with_the_same_ids_is_a_new_data_version(tmp_path):
    """Downstream staleness follows data versions: a seed row whose text changed (same row, same
    pair id) must change the versions of deduplicated_pairs and training_splits, or the reward
    models would never retrain on the edit."""
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    rows = [{"chosen": conv(f"Question {i} about owls?", f"Owls are birds, fact {i}."),
             "rejected": conv(f"Question {i} about owls?", f"No idea {i}.")} for i in range(12)]
    path = seeds / "owls.jsonl"
    settings = load_settings_in(tmp_path, seeds_dir=str(seeds))
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(seed_partitions.name, ["owls"])

    def versions():
        resources = build_resources(settings)
        assert materialize([seed_ingestion], partition_key="owls", instance=instance, resources=resources).success
        result = materialize([eval_items, deduplicated_pairs, training_splits], instance=instance, resources=resources)
        return {node: result.asset_materializations_for_node(node)[0].tags["dagster/data_version"]
                for node in ("deduplicated_pairs", "training_splits")}

    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    before = versions()
    assert versions() == before  # the same content gives the same versions
    rows[3]["chosen"][1]["content"] = "Owls are birds of prey that hunt at night."
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    after = versions()
    assert after["deduplicated_pairs"] != before["deduplicated_pairs"]
    assert after["training_splits"] != before["training_splits"]
