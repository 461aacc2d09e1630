"""The reward_model asset under real Dagster: embedded seeds -> dedup -> splits -> training via
Pipes into the CheckpointStore; a failing run (missing backbone, NaN loss) leaves the previous
checkpoint of its variant intact and loadable. Then the whole evaluation chain on CPU: pairwise
accuracy, RewardBench sections, multi-turn Best-of-N with a real vLLM policy, user simulator and
judge (the tiny Llama), judge agreement and the report."""

import json

import pytest
from dagster import DagsterInstance, materialize

from music_assets.curation.assets import deduplicated_pairs, eval_items, training_splits
from music_assets.assembly import build_resources
from music_assets.common.partitions import seed_partitions
from music_assets.training.assets import reward_model
from music_assets.seeds.assets import seed_ingestion
from tests.helpers import MINILM_TRAINING, MT_BENCH, TINY_LLAMA, load_settings_in

# Best-of-N on the tiny Llama: small, but every mechanism (N candidates per request, scripted
# MT-Bench turns, the user simulator, the order-swapped judge) runs for real.
EVALUATION = {"best_of_n": [2, 4], "turns": 2, "contexts_per_source": 3, "agreement_pairs": 4,
              "policy_sampling": {"max_tokens": 32}, "user_sampling": {"max_tokens": 32},
              "judge_sampling": {"max_tokens": 24, "temperature": 0.0, "top_p": 1.0}}


# A RewardBench-format evaluation file: two known subsets, one unknown subset, one empty response.
REWARDBENCH_ROWS = [
    {"prompt": "Name a prime number between 10 and 14.", "chosen": "11, or 13.", "rejected": "12.", "subset": "math-prm"},
    {"prompt": "Write a Python function that returns the square of x.", "chosen": "def sq(x):\n    return x * x",
     "rejected": "def sq(x):\n    return x + x", "subset": "hep-python"},
    {"prompt": "Say hello politely.", "chosen": "Hello, nice to meet you.", "rejected": "What.", "subset": "my-own-subset"},
    {"prompt": "Tell me a fact about owls.", "chosen": "Owls can rotate their heads about 270 degrees.", "rejected": "",
     "subset": "alpacaeval-easy"},
]


def _settings(tmp_path, **training):
    rb = tmp_path / "rewardbench.jsonl"
    rb.write_text("\n".join(json.dumps(r) for r in REWARDBENCH_ROWS) + "\n")
    return load_settings_in(tmp_path, training={"options": {**MINILM_TRAINING["options"], **training}},
                            **TINY_LLAMA, evaluation=EVALUATION,
                            eval_sets={"rb": {"path": str(rb), "format": "prompt_chosen_rejected", "rewardbench": True},
                                       "mt_bench": {"path": str(MT_BENCH), "format": "prompts"}})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rm-asset")
    settings = _settings(tmp)
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(seed_partitions.name, ["embedded"])
    resources = build_resources(settings)
    assert materialize([seed_ingestion], partition_key="embedded", instance=instance, resources=resources).success
    assert materialize([eval_items, deduplicated_pairs, training_splits], instance=instance, resources=resources).success
    return tmp, instance


@pytest.fixture(scope="module")
def baseline(prepared):
    """The baseline reward model, trained once through Pipes; the evaluation below reuses it."""
    tmp, instance = prepared
    result = materialize([reward_model], partition_key="baseline", instance=instance,
                         resources=build_resources(_settings(tmp)), selection=["reward_model"])
    assert result.success
    return result.asset_materializations_for_node("reward_model")[0].metadata


@pytest.mark.slow
def test_reward_model_asset_trains_through_pipes_and_keeps_checkpoints_safe(prepared, baseline):
    from transformers import AutoModelForSequenceClassification

    tmp, instance = prepared
    settings = _settings(tmp)
    meta = baseline
    folder = meta["checkpoint"].value
    assert meta["steps"].value == 3 and 0 <= meta["test_accuracy"].value <= 1 and meta["test_pairs"].value > 0
    assert "data:image/png;base64," in meta["training_curve"].value
    assert meta["upstream_data_versions"].value["training_splits"]
    saved = json.loads(open(f"{folder}/music_metadata.json").read())
    assert saved["upstream"] == meta["upstream_data_versions"].value and saved["config"]["max_steps"] == 3
    AutoModelForSequenceClassification.from_pretrained(folder)
    latest = (settings.home / "checkpoints" / "baseline" / "LATEST").read_text()

    # failing runs: a missing backbone, then a diverging loss; neither touches the checkpoint
    for bad, message in (({"backbone": str(tmp / "no-such-model")}, "no model folder"),
                         ({"learning_rate": 1e30}, "loss became")):
        failed = materialize([reward_model], partition_key="baseline", instance=instance, raise_on_error=False,
                             resources=build_resources(_settings(tmp, **bad)))
        assert not failed.success
        logs = "\n".join(str(e.event_specific_data) + (e.message or "") for e in failed.all_events)
        assert message in logs
        assert (settings.home / "checkpoints" / "baseline" / "LATEST").read_text() == latest
        AutoModelForSequenceClassification.from_pretrained(folder)


@pytest.fixture(scope="module")
def evaluated(prepared, baseline):
    """Both variants trained (the baseline by its fixture) and evaluated; returns each
    rm_evaluation materialization's metadata."""
    from music_assets.evaluation.assets import rm_evaluation

    tmp, instance = prepared
    resources = build_resources(_settings(tmp))
    metas = {}
    for variant, selection in (("baseline", ["rm_evaluation"]), ("music", ["reward_model", "rm_evaluation"])):
        result = materialize([reward_model, rm_evaluation], partition_key=variant, instance=instance,
                             resources=resources, selection=selection)
        assert result.success
        metas[variant] = result.asset_materializations_for_node("rm_evaluation")[0].metadata
    return tmp, instance, metas


@pytest.mark.slow
def test_evaluation_of_both_variants_and_the_report(evaluated):
    """Both variants trained, evaluated on held-out pairs and the RewardBench-format set; the
    report compares them with sample sizes, intervals and a significance verdict."""
    import duckdb

    from music_assets.evaluation.assets import evaluation_report, mcnemar_p

    tmp, instance, metas = evaluated
    settings = _settings(tmp)
    resources = build_resources(settings)
    for meta in metas.values():
        assert meta["skipped"].value == {} and meta["unknown_subsets"].value == {"rb/my-own-subset": 1}
        acc = meta["accuracy"].value
        assert acc["heldout_seed"]["n"] > 0 and len(acc["heldout_seed"]["ci95"]) == 2 and acc["rb"]["n"] == 3
    report = materialize([evaluation_report], instance=instance, resources=resources)
    assert report.success
    path = settings.home / "reports" / "evaluation_report.md"
    text = path.read_text()
    assert "| heldout_seed |" in text and "significant" in text and "Chat Hard" in text and "96.9" in text
    assert (settings.home / "reports" / "accuracy_by_turns.png").stat().st_size > 1000
    assert (settings.home / "reports" / "sections_rb.png").exists()
    assert "| my-own-subset | none (not a RewardBench subset) | 1 |" in text
    md = report.asset_materializations_for_node("evaluation_report")[0].metadata["report"].value
    assert "data:image/png;base64," in md
    con = duckdb.connect(str(settings.duckdb_path), read_only=True)
    per_variant = dict(con.execute("SELECT variant, count(*) FROM music.rm_scores GROUP BY 1").fetchall())
    assert per_variant["baseline"] == per_variant["music"] > 0
    quarantined = con.execute("SELECT rule FROM music.eval_quarantine WHERE eval_set = 'rb'").fetchall()
    assert quarantined == [("empty_message",)]
    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(0, 10) == pytest.approx(2 / 1024)


MT_BENCH_SECOND_TURNS = {json.loads(line)["turns"][1]
                         for line in MT_BENCH.read_text().splitlines()}


@pytest.mark.slow
def test_both_variants_validate_on_the_same_pairs(evaluated):
    """The baseline's validation pairs are the music variant's (seed and MUSIC held-out pairs), so
    neither variant's checkpoint selection sees a different validation set; accuracy by origin."""
    from dagster import AssetKey

    from music_assets.common.metadata import latest_materialization

    tmp, instance, _ = evaluated
    metas = {v: latest_materialization(instance, AssetKey("reward_model"), v).asset_materialization.metadata
             for v in ("baseline", "music")}
    assert metas["baseline"]["validation_pairs"].value == metas["music"]["validation_pairs"].value > 0
    for meta in metas.values():
        assert 0.0 <= meta["validation_accuracy_seed"].value <= 1.0
        assert meta["strategy"].value == "ddp" and meta["device"].value == "cpu"


@pytest.mark.slow
def test_best_of_n_with_a_judge_end_to_end(evaluated):
    """Real vLLM (tiny Llama) as policy, user simulator and judge; both reward models pick from
    the same candidates; MT-Bench's second question is the scripted second user turn; the
    judge's verdicts, its errors and the drops all add up; the report shows win rates."""
    import duckdb

    from music_assets.evaluation.best_of_n_assets import best_of_n, judge_agreement
    from music_assets.evaluation.scorers import conversation_scorer
    from music_assets.evaluation.assets import evaluation_report

    tmp, instance, _ = evaluated
    settings = _settings(tmp)
    resources = build_resources(settings)
    result = materialize([best_of_n, judge_agreement, evaluation_report], instance=instance, resources=resources)
    assert result.success
    meta = result.asset_materializations_for_node("best_of_n")[0].metadata
    summary = meta["win_rate_by_n"].value
    assert set(summary) == {"2", "4"}
    assert set(meta["contexts_by_source"].value) == {"heldout_seed", "mt_bench"}

    con = duckdb.connect(str(settings.duckdb_path), read_only=True)
    convs = con.execute("SELECT source, context_id, n, variant, checkpoint, messages, picks, drop_reason "
                        "FROM music.bon_conversations").fetchall()
    judged = con.execute("SELECT context_id, n, outcome, reason, verdict_forward, verdict_swapped, raw_forward, "
                         "drop_reason FROM music.bon_judgments").fetchall()
    verdicts = con.execute("SELECT eval_set, count(*) FROM music.judge_verdicts GROUP BY 1").fetchall()
    con.close()
    contexts = {(c[1], c[2]) for c in convs}
    assert len(convs) == 2 * len(contexts) and len(judged) == len(contexts) == 2 * meta["contexts"].value

    scorers = {}
    by_key = {}
    for source, cid, n, variant, folder, messages, picks_json, dropped in convs:
        by_key[(cid, n, variant)] = (messages, json.loads(picks_json), dropped)
        if dropped:
            continue
        picks = json.loads(picks_json)
        assert [p["turn"] for p in picks] == [1, 2]
        scorer = scorers.setdefault(variant, conversation_scorer(folder))
        for p in picks:
            assert 1 <= len(p["candidates"]) == len(p["rewards"]) <= n
            assert p["rewards"][p["picked"]] == max(p["rewards"])  # the reward model's own best
        # the kept answers really are the picked candidates, and rescoring them gives the same reward
        answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"][-2:]
        for p, i in zip(picks, answers):
            assert messages[i]["content"] == p["candidates"][p["picked"]]
            assert scorer([[messages[: i + 1]]])[0][0] == pytest.approx(p["rewards"][p["picked"]], abs=1e-4)
        if source == "mt_bench":  # the second user turn is MT-Bench's own second question
            assert messages[2]["role"] == "user" and messages[2]["content"] in MT_BENCH_SECOND_TURNS
    # same contexts and seeds: at turn 1 both reward models choose among the same candidates
    for cid, n in contexts:
        a, b = by_key[(cid, n, "baseline")], by_key[(cid, n, "music")]
        if a[1] and b[1]:
            assert a[1][0]["candidates"] == b[1][0]["candidates"]

    for _cid, _n, outcome, reason, vf, vs, raw, dropped in judged:
        if dropped is not None:
            assert outcome is None and reason is None
        elif vf is None or vs is None:  # an order without a verdict: a judge error, not a tie
            assert outcome is None and reason in {"judge_error", "judge_truncated", "unparsed"} and raw is not None
        else:
            assert outcome in {"win", "tie", "loss"} and (reason == "identical" or raw)  # every judge output is kept
    for n, s in summary.items():
        counted = sum(1 for j in judged if j[1] == int(n) and j[2] is not None)
        assert s["n"] == counted == s["wins"] + s["ties"] + s["losses"]
        assert s["asked"] == counted - s["reasons"].get("identical", 0) + s["errors"]
        assert s["errors"] == sum(s["judge_errors"].values())
    assert dict(verdicts) == {"heldout_seed": 4, "rb": 3}  # up to agreement_pairs per set

    text = (settings.home / "reports" / "evaluation_report.md").read_text()
    assert "## Multi-turn Best-of-N" in text and "judge errors: refused / cut / unparsed" in text and "## Judge agreement" in text
    assert (settings.home / "reports" / "win_rate_by_n.png").stat().st_size > 1000


def test_best_of_n_without_a_checkpoint_names_the_variant(tmp_path):
    from music_assets.evaluation.best_of_n_assets import best_of_n

    settings = _settings(tmp_path)
    result = materialize([best_of_n], instance=DagsterInstance.ephemeral(), resources=build_resources(settings),
                         raise_on_error=False)
    assert not result.success
    logs = "\n".join(str(e.event_specific_data) + (e.message or "") for e in result.all_events)
    assert "no checkpoint of reward model 'baseline'" in logs
