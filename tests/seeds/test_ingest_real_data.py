"""Ingest every file in tests/data and compare with counts derived here, independently.

The expected figures are computed with plain string operations on the raw files, not with the
loader's parser, so a loader bug cannot hide by agreeing with itself.
"""

import gzip
import json

import pytest

from music_assets.seeds.ingest import ingest
from music_assets.seeds.reader import ResolvedSource


def source(name, path, fmt="auto"):
    return ResolvedSource(name, str(path), fmt, path=path)


def test_hh_rlhf_harmless_counts(real_data):
    path = real_data / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    raw = [json.loads(line) for line in gzip.open(path, "rt", encoding="utf-8")]

    def well_formed(text):
        humans, assistants = text.count("\n\nHuman:"), text.count("\n\nAssistant:")
        return humans == assistants and not text.rstrip().endswith("Assistant:")

    good = [r for r in raw if r["chosen"] != r["rejected"] and well_formed(r["chosen"]) and well_formed(r["rejected"])]
    result = ingest(source("hh", path))

    assert len(raw) == 2312
    assert len(result.pairs) == len(good) == 2299
    assert len(result.quarantine) == len(raw) - len(good) == 13
    assert sum(p["user_turns"] for p in result.pairs) == sum(r["chosen"].count("\n\nHuman:") for r in good)
    # HH-RLHF pairs share every message but the last assistant turn.
    assert all(p["prefix_messages"] == p["chosen_messages"] - 1 for p in result.pairs)
    reasons = result.reasons()
    assert reasons == {"roles_not_alternating": 9, "empty_message": 4}, reasons


def test_ultrafeedback_slice_counts(real_data):
    path = real_data / "ultrafeedback" / "eval_clean.jsonl"
    raw = [json.loads(line) for line in path.open()]
    identical = sum(r["chosen"] == r["rejected"] for r in raw)
    result = ingest(source("uf", path))
    assert (len(raw), identical) == (200, 1)
    assert len(result.pairs) == 199 and len(result.quarantine) == 1
    assert result.quarantine[0]["reason"] == "chosen is identical to rejected"
    assert {p["format"] for p in result.pairs} == {"prompt_chosen_rejected"}
    assert all(p["user_turns"] == 1 and p["chosen_messages"] == 2 for p in result.pairs)
    # source_index is the row's own id; metadata survives as extra JSON.
    assert result.pairs[0]["original_id"] == str(raw[0]["source_index"])
    assert "score_chosen" in result.pairs[0]["extra"]


def test_llmbar_natural_counts_and_labels(real_data):
    path = real_data / "llmbar" / "natural.json"
    raw = json.loads(path.read_text())
    result = ingest(source("llmbar", path))
    assert len(result.pairs) == len(raw) == 100 and not result.quarantine
    for pair, rec in zip(result.pairs, raw):
        better = rec["output_1"] if rec["label"] == 1 else rec["output_2"]
        assert pair["chosen"][-1]["content"] == better
        assert pair["chosen"][0]["content"] == rec["input"]


def test_mt_bench_questions_as_prompt_only_rows(real_data):
    path = real_data / "mt-bench" / "question.jsonl"
    raw = [json.loads(line) for line in path.open()]
    result = ingest(source("mtbench", path))
    assert len(result.pairs) == len(raw) == 80 and not result.quarantine
    assert {p["kind"] for p in result.pairs} == {"prompts"}
    assert sum(p["user_turns"] for p in result.pairs) == sum(len(r["turns"]) for r in raw) == 160


def test_content_hash_is_stable_across_runs(real_data):
    path = real_data / "llmbar" / "natural.json"
    first, second = ingest(source("a", path)), ingest(source("b", path))
    assert [p["content_hash"] for p in first.pairs] == [p["content_hash"] for p in second.pairs]
    assert len({p["content_hash"] for p in first.pairs}) == 100


def test_corrupted_copy_quarantines_bad_rows_and_keeps_every_good_one(real_data, tmp_path):
    lines = gzip.open(real_data / "hh-rlhf" / "harmless-base-test.jsonl.gz", "rb").read().split(b"\n")[:60]
    clean = ingest(source("clean", _write(tmp_path / "clean.jsonl", lines)))
    assert not clean.quarantine  # the first 60 rows are all well formed

    bad = list(lines)
    bad[2] = bad[2][: len(bad[2]) // 2]  # truncated line
    bad[6] = bad[6].replace(b"Assistant:", b"Assistant: \xff\xfe", 1)  # invalid UTF-8
    rec = json.loads(bad[10])
    bad[10] = json.dumps({"rejected": rec["rejected"], "chosen_text": rec["chosen"]}).encode()  # renamed field
    rec = json.loads(bad[14])
    bad[14] = json.dumps({"chosen": rec["rejected"], "rejected": rec["chosen"] + "\n\nHuman: and?"}).encode()
    rec = json.loads(bad[18])
    bad[18] = json.dumps({"chosen": rec["chosen"], "rejected": rec["chosen"]}).encode()  # identical sides
    bad[22] = b'{"chosen": 42, "rejected": "x"}'  # wrong types
    result = ingest(source("bad", _write(tmp_path / "bad.jsonl", bad)))

    by_row = {q["row_number"]: q["reason"] for q in result.quarantine}
    assert set(by_row) == {3, 7, 11, 15, 19, 23}
    assert by_row[3].startswith("malformed JSON")
    assert by_row[7].startswith("invalid UTF-8")
    assert "unrecognized record shape" in by_row[11] or "missing field" in by_row[11]
    assert "roles do not alternate" in by_row[15] or "does not end with an assistant" in by_row[15]
    assert by_row[19] == "chosen is identical to rejected"
    assert "must be" in by_row[23] or "unrecognized" in by_row[23]
    assert "\ufffd" in next(q["raw_excerpt"] for q in result.quarantine if q["row_number"] == 7)
    # every untouched row lands, identical to the clean ingest
    kept = {p["row_number"]: p["content_hash"] for p in result.pairs}
    expected = {p["row_number"]: p["content_hash"] for p in clean.pairs if p["row_number"] not in by_row}
    assert kept == expected and len(kept) == 54


def test_unreadable_file_fails_naming_the_file(tmp_path):
    from music_assets.seeds.reader import SeedFileError

    broken = tmp_path / "broken.json"
    broken.write_text('[{"prompt": "q", ')
    with pytest.raises(SeedFileError, match="broken.json"):
        ingest(source("broken", broken))
    gz = tmp_path / "fake.jsonl.gz"
    gz.write_bytes(b"not gzip at all")
    with pytest.raises(SeedFileError, match="fake.jsonl.gz"):
        ingest(source("fake", gz))
    with pytest.raises(SeedFileError, match="missing.jsonl"):
        ingest(source("missing", tmp_path / "missing.jsonl"))


def test_parquet_source(tmp_path, real_data):
    import polars as pl

    raw = [json.loads(line) for line in (real_data / "ultrafeedback" / "eval_clean.jsonl").open()]
    path = tmp_path / "uf.parquet"
    pl.DataFrame([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in raw[:20]]).write_parquet(path)
    result = ingest(source("ufp", path))
    assert len(result.pairs) + len(result.quarantine) == 20
    assert result.pairs[0]["chosen"][0]["content"] == raw[0]["prompt"]


def _write(path, lines):
    path.write_bytes(b"\n".join(lines))
    return path
