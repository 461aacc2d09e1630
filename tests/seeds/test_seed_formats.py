"""Normalization rules, one input shape or failure at a time."""

import pytest

from music_assets.seeds.formats import RowRejected, detect_format, normalize

U, A = "user", "assistant"


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def test_conversational_shares_prefix_and_keeps_extra_fields():
    rec = {
        "id": "x1",
        "source": "sky",
        "chosen": msgs((U, "hi"), (A, "hello"), (U, "2+2?"), (A, "4")),
        "rejected": msgs((U, "hi"), (A, "hello"), (U, "2+2?"), (A, "5")),
    }
    pair = normalize(rec)
    assert pair.format == "conversational" and pair.kind == "pair"
    assert pair.original_id == "x1" and pair.extra == {"source": "sky"}
    assert pair.chosen[-1]["content"] == "4" and pair.rejected[-1]["content"] == "5"


def test_hh_rlhf_transcript_is_split_into_turns():
    rec = {"chosen": "\n\nHuman: a?\n\nAssistant: b\n\nHuman: c?\n\nAssistant: d",
           "rejected": "\n\nHuman: a?\n\nAssistant: b\n\nHuman: c?\n\nAssistant: e"}
    pair = normalize(rec)
    assert pair.format == "hh_rlhf"
    assert pair.chosen == msgs((U, "a?"), (A, "b"), (U, "c?"), (A, "d"))


def test_explicit_prompt_with_strings_and_with_message_lists():
    pair = normalize({"prompt": "q", "chosen": "good", "rejected": "bad", "subset": "alpacaeval-easy"})
    assert pair.format == "prompt_chosen_rejected"
    assert pair.chosen == msgs((U, "q"), (A, "good")) and pair.extra == {"subset": "alpacaeval-easy"}
    pair = normalize({"prompt": msgs((U, "q")), "chosen": msgs((A, "good")), "rejected": msgs((A, "bad"))})
    assert pair.rejected == msgs((U, "q"), (A, "bad"))


def test_llmbar_label_picks_the_chosen_output():
    pair = normalize({"input": "q", "output_1": "one", "output_2": "two", "label": 2})
    assert pair.chosen[-1]["content"] == "two" and pair.rejected[-1]["content"] == "one"


def test_prompt_only_rows_keep_user_turns():
    pair = normalize({"question_id": 81, "category": "writing", "turns": ["t1", "t2"]})
    assert pair.kind == "prompts" and pair.chosen == msgs((U, "t1"), (U, "t2")) and pair.rejected == []
    assert pair.original_id == "81" and pair.extra == {"category": "writing"}


@pytest.mark.parametrize(
    "record, field, reason",
    [
        ({"chosen": msgs((U, "q"), (A, "a"))}, "rejected", "missing field `rejected`"),
        ({"chosen": msgs((U, "q"), (A, "")), "rejected": msgs((U, "q"), (A, "b"))}, "chosen[1]", "empty message"),
        ({"chosen": msgs((U, "q"), ("robot", "a")), "rejected": msgs((U, "q"), (A, "b"))}, "chosen[1]", "unknown role"),
        ({"chosen": msgs((U, "q"), (A, "a"), (U, "more")), "rejected": msgs((U, "q"), (A, "b"))}, "chosen",
         "does not end with an assistant turn"),
        ({"chosen": msgs((U, "q"), (A, "a")), "rejected": msgs((U, "q"), (A, "a"))}, "rejected", "identical"),
        ({"chosen": msgs((U, "q"), (A, "a\udcff")), "rejected": msgs((U, "q"), (A, "b"))}, "chosen[1]",
         "invalid UTF-8"),
        ({"chosen": msgs((U, "q"), (A, "x" * 50)), "rejected": msgs((U, "q"), (A, "b"))}, "chosen[1]", "too long"),
        ({"chosen": msgs((A, "a"), (U, "q")), "rejected": msgs((U, "q"), (A, "b"))}, "chosen[0]",
         "roles do not alternate"),
        ({"input": "q", "output_1": "a", "output_2": "b", "label": 3}, "label", "must be 1 or 2"),
        ({"chosen": "just text", "rejected": "other"}, "chosen", "no `prompt`"),
        ({"foo": 1}, "", "unrecognized record shape"),
        (["not", "an", "object"], "", "expected a JSON object"),
        ({"chosen": [{"role": "user", "content": 3}], "rejected": []}, "chosen[0]", "must be a string"),
    ],
)
def test_bad_rows_are_rejected_with_field_and_reason(record, field, reason):
    with pytest.raises(RowRejected) as info:
        normalize(record, max_chars=40)
    assert info.value.field == field
    assert reason in info.value.reason


def test_named_format_overrides_detection():
    assert detect_format({"prompt": "q", "chosen": "a", "rejected": "b"}) == "prompt_chosen_rejected"
    with pytest.raises(RowRejected, match="missing field `label`"):
        normalize({"prompt": "q", "chosen": "a", "rejected": "b"}, fmt="llmbar")
