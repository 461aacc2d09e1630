"""The memory plan before launch (music_assets/training/memory_plan.py): parameter counts equal the
reward models transformers builds on the meta device, the activation estimate follows the bytes
autograd really keeps on small models, the byte arithmetic per precision and strategy is checked
by hand, the paper's Gemma-2-9B recipe on 8 x 80 GB, the `plan-training` command, and the refusal
that `reward_model` raises before a GPU launch that cannot fit."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import pytest
import torch
from dagster import DagsterInstance, materialize
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    Gemma2Config,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from music_assets.assembly import build_resources
from music_assets.cli import main
from music_assets.settings import REPO_CONFIGS, load_settings
from music_assets.training.assets import reward_model
from music_assets.training.config import TrainConfig, TrainingConfig
from music_assets.training.memory_plan import (
    GIB,
    PUBLISHED_CONFIGS,
    Shape,
    activation_bytes,
    launch_refusal,
    parameter_count,
    plan_memory,
    plan_training,
    refusal,
    shape_of,
)
from tests.helpers import load_settings_in

# Published dimensions. SmolLM2-135M (Llama architecture) and Gemma-2-9B.
SMOLLM2 = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
               intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)
GEMMA2_9B = dict(hidden_size=3584, num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                 intermediate_size=14336, vocab_size=256000, tie_word_embeddings=True)
SMALL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
             vocab_size=1000)
CONFIGS = {
    "smollm2-135m": lambda: LlamaConfig(**SMOLLM2),
    "gemma-2-9b": lambda: Gemma2Config(**GEMMA2_9B),
    "tiny-llama": lambda: LlamaConfig(**SMALL),
    "tiny-llama-biases-untied": lambda: LlamaConfig(**SMALL, attention_bias=True, mlp_bias=True,
                                                    tie_word_embeddings=False),
    "tiny-gemma2": lambda: Gemma2Config(**{**SMALL, "num_attention_heads": 4, "head_dim": 64, "intermediate_size": 1024,
                                           "sliding_window": 64}),
    "tiny-gemma": lambda: GemmaConfig(**{**SMALL, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 64}),
    "tiny-qwen2": lambda: Qwen2Config(**SMALL),
    "tiny-qwen3": lambda: Qwen3Config(**SMALL, head_dim=48),
    "tiny-mistral": lambda: MistralConfig(**SMALL),
    "minilm-l6": lambda: BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                                    vocab_size=30522),
    "tiny-bert": lambda: BertConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                                    vocab_size=1000, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
}
PAPER = TrainConfig(backbone="google/gemma-2-9b-it", max_length=2048, batch_size=64, micro_batch_size=2, precision="bf16")


def meta_parameters(config) -> int:
    """Parameters of the one-output reward model transformers builds from `config`, on the meta device."""
    config.num_labels = 1
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parameter_count_equals_the_model_on_the_meta_device(name):
    assert parameter_count(CONFIGS[name]()) == meta_parameters(CONFIGS[name]())


def test_the_published_counts_and_the_tied_embeddings():
    assert parameter_count(CONFIGS["smollm2-135m"]()) == 134_515_584
    assert parameter_count(CONFIGS["gemma-2-9b"]()) == 9_241_709_568  # "~9.24B"
    assert parameter_count(PUBLISHED_CONFIGS["google/gemma-2-9b-it"]) == 9_241_709_568
    # A reward model has no LM head: tied or not, the embedding matrix counts once.
    assert parameter_count(LlamaConfig(**{**SMOLLM2, "tie_word_embeddings": False})) == 134_515_584


@pytest.mark.slow
def test_parameter_count_of_the_provisioned_smollm2_folder():
    from music_assets.model_provisioning import smollm2_dir

    folder = smollm2_dir()
    assert parameter_count(folder) == parameter_count(folder / "config.json") == 134_515_584
    assert shape_of(folder) == shape_of(CONFIGS["smollm2-135m"]())


def saved_bytes(config, precision: str, attention: str, seq: int, batch: int) -> int:
    """The bytes of the tensors autograd keeps for backward in one forward pass (weights excluded, each
    storage once): what the activation estimate estimates."""
    config.num_labels, config.pad_token_id = 1, 0
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation=attention)
    model.to(torch.bfloat16 if precision == "bf16-pure" else torch.float32).train()
    ids = torch.randint(1, 1000, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, :10] = 0  # padded, as reward-model batches are
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model(input_ids=ids, attention_mask=mask)
    return sum(kept.values())


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma2", "tiny-bert", "tiny-qwen3"])
def test_activation_estimate_follows_what_autograd_keeps(name, attention):
    """DDP's three precisions (bf16: autocast over fp32 weights); never under, at most 16% over."""
    options = TrainConfig(max_length=128, micro_batch_size=2)
    config = CONFIGS[name]()
    config._attn_implementation = attention
    for precision in ("fp32", "bf16", "bf16-pure"):
        estimate = activation_bytes(shape_of(config), options, precision, "ddp")
        measured = saved_bytes(CONFIGS[name](), precision, attention, options.max_length, 2 * options.micro_batch_size)
        assert 0.97 <= estimate / measured <= 1.16, (precision, estimate, measured)


# A made-up backbone for hand arithmetic: P = 2 x 1000 + 500 = 2500 parameters.
TOY = Shape("llama", hidden=8, layers=2, heads=2, kv_heads=2, head_dim=4, intermediate=16, norms_per_layer=2,
            gated_mlp=True, encoder=False, layer_params=1000, root_params=500, attention="sdpa", softcap=False,
            mask_kinds=1)
TOY_OPTIONS = TrainConfig(max_length=4, micro_batch_size=1)  # 2 sequences x 4 tokens


@pytest.mark.parametrize("precision, strategy, processes, expected", [
    ("fp32", "ddp", 8, (10_000, 10_000, 20_000)),  # 4 + 4 + 8 B/param, a full replica per rank
    ("bf16", "ddp", 8, (10_000, 10_000, 20_000)),  # mixed: fp32 master weights, grads and moments
    ("auto", "ddp", 1, (10_000, 10_000, 20_000)),  # auto = bf16 on a GPU
    ("bf16-pure", "ddp", 8, (5_000, 5_000, 10_000)),  # 2 + 2 + 4 B/param
    # fsdp: P/N sharded + root (500) and two layers (2 x 1000) gathered, + the largest unit's grads, at compute width
    ("bf16", "fsdp", 4, (625 * 4 + 2_500 * 2, 625 * 4 + 1_000 * 2, 2 * 625 * 4)),
    ("fp32", "fsdp", 2, (1_250 * 4 + 2_500 * 4, 1_250 * 4 + 1_000 * 4, 2 * 1_250 * 4)),
    ("bf16-pure", "fsdp", 4, (625 * 2 + 2_500 * 2, 625 * 2 + 1_000 * 2, 2 * 625 * 2)),
])
def test_state_bytes_by_hand(precision, strategy, processes, expected):
    options = replace(TOY_OPTIONS, precision=precision)
    plan = plan_memory(TOY, options, TrainingConfig(options=options, processes=processes, strategy=strategy), 80)
    assert (plan.parameters, plan.gradients, plan.optimizer) == expected
    assert plan.precision == ("bf16" if precision == "auto" else precision)


@pytest.mark.parametrize("precision, strategy, checkpointing, expected", [
    # per token and layer: norms 2 x 8h = 128, linear inputs e*h*2 = 64, SDPA 5*q*e = 160, gated MLP 4*I*e = 256;
    # 8 tokens, 2 layers; outside: final norm (8h + e*h) * 8 = 768, padding mask b*s*s*e = 128
    ("fp32", "ddp", False, 2 * 8 * (128 + 64 + 160 + 256) + 768 + 128),
    # autocast: a copy per linear (5 x e*h = 80), e = 2; + the bf16 weight casts 2 x L x P_layer = 4000
    ("bf16", "ddp", False, 2 * 8 * (128 + 80 + 80 + 128) + 640 + 64 + 4_000),
    # FSDP's bf16 inputs, checkpointed: L boundaries of t*h*2 bytes + one layer + outside
    ("bf16", "fsdp", True, 2 * 8 * 8 * 2 + 8 * (128 + 32 + 80 + 128) + 640 + 64),
])
def test_activation_bytes_by_hand(precision, strategy, checkpointing, expected):
    options = replace(TOY_OPTIONS, gradient_checkpointing=checkpointing)
    assert activation_bytes(TOY, options, precision, strategy) == expected


def test_margin_and_verdict():
    plan = plan_memory(TOY, TOY_OPTIONS, TrainingConfig(options=TOY_OPTIONS), 80)
    assert plan.margin == 2 * GIB + 4 * GIB and plan.usable == 74 * GIB  # 2 GiB + 5%
    assert plan.fits and refusal(plan) is None
    assert not replace(plan, activations=74 * GIB).fits


def paper_plan(strategy: str, checkpointing: bool):
    options = replace(PAPER, gradient_checkpointing=checkpointing)
    return plan_memory(PUBLISHED_CONFIGS[PAPER.backbone], options,
                       TrainingConfig(options=options, processes=8, strategy=strategy), 80)


def test_the_paper_recipe_on_8_gpus_of_80_gb():
    ddp, fsdp = paper_plan("ddp", True), paper_plan("fsdp", True)
    assert ddp.parameters == ddp.gradients == 4 * 9_241_709_568 and ddp.optimizer == 8 * 9_241_709_568
    assert not ddp.fits  # 16 B/param alone is 138 GiB
    assert fsdp.fits and fsdp.total < 30 * GIB
    # Without gradient checkpointing, 8,192 tokens per rank keep ~91 GiB of activations: nothing fits.
    assert not paper_plan("fsdp", False).fits
    assert paper_plan("fsdp", False).activations > 85 * GIB


def test_the_paper_config_file_plans_offline():
    """configs/paper-gemma2-9b.yaml names a hub id; the published config stands in when it is not cached."""
    training = load_settings(REPO_CONFIGS / "paper-gemma2-9b.yaml").training
    plan = plan_training(training, 80, attn_implementation="eager")
    assert (plan.shape.parameters, plan.strategy, plan.processes, plan.precision) == (9_241_709_568, "fsdp", 8, "bf16")
    assert plan.fits and plan.gradient_checkpointing  # as the config sets it: FSDP, gradient checkpointing
    assert not plan_training(replace(training, strategy="ddp"), 80, attn_implementation="eager").fits


def test_plan_training_command(capsys, tmp_path):
    paper = str(REPO_CONFIGS / "paper-gemma2-9b.yaml")
    assert main(["--config", paper, "plan-training", "--strategy", "ddp", "--strategy", "fsdp",
                 "--gradient-checkpointing"]) == 0
    out = capsys.readouterr().out
    assert "9,241,709,568 parameters" in out and "gradient checkpointing on" in out
    rows = {line[:16].strip(): line[16:] for line in out.splitlines()}
    assert rows["per rank"].split() == ["ddp", "x", "8,", "bf16", "fsdp", "x", "8,", "bf16"]
    assert rows["verdict"].split() == ["DOES", "NOT", "FIT", "FITS"]
    assert rows["capacity"].split() == ["80.00", "GiB"] * 2
    assert rows["parameters"].split()[0] == f"{4 * 9_241_709_568 / GIB:.2f}"

    assert main(["--config", paper, "plan-training", "--processes", "16", "--gpu-memory-gib", "141",
                 "--precision", "bf16-pure"]) == 0
    rows = {line[:16].strip(): line[16:] for line in capsys.readouterr().out.splitlines()}
    assert rows["per rank"].split() == ["fsdp", "x", "16,", "bf16-pure"]  # the config's strategy
    assert rows["capacity"].split() == ["141.00", "GiB"]

    gpt2 = write_config(tmp_path / "gpt2", GPT2Config(n_layer=2, n_embd=64, n_head=2))
    (tmp_path / "gpt2.yaml").write_text(f"training: {{options: {{backbone: {gpt2}}}}}\n")
    assert main(["--config", str(tmp_path / "gpt2.yaml"), "plan-training"]) == 2
    assert "no memory formulas for model_type 'gpt2'" in capsys.readouterr().err


def write_config(folder, config):
    config.save_pretrained(folder)
    return str(folder)


def test_launch_refusal(tmp_path):
    backbone = write_config(tmp_path / "gemma", Gemma2Config(**GEMMA2_9B))
    options = replace(PAPER, backbone=backbone, gradient_checkpointing=True)
    ddp = TrainingConfig(options=options, processes=8)
    message = launch_refusal(ddp, 80)
    assert message.startswith("the training plan needs 160.")
    for hint in ("training.strategy: fsdp", "bf16-pure", "micro_batch_size", "74.00 GiB"):
        assert hint in message
    assert launch_refusal(replace(ddp, strategy="fsdp"), 80) is None
    warnings = []
    other = write_config(tmp_path / "gpt2", GPT2Config(n_layer=2, n_embd=64, n_head=2))
    assert launch_refusal(replace(ddp, options=replace(options, backbone=other)), 80, warn=warnings.append) is None
    assert "no memory plan before launch" in warnings[0] and "'gpt2'" in warnings[0]


def test_reward_model_refuses_a_gpu_launch_that_cannot_fit(tmp_path, monkeypatch):
    """The asset's check, with the GPU's memory reported as 80 GiB: the run fails before any data is read."""
    backbone = write_config(tmp_path / "gemma", Gemma2Config(**GEMMA2_9B))
    settings = load_settings_in(tmp_path, compute={"device": "cuda", "dtype": "bfloat16"},
                                training={"processes": 8, "options": {"backbone": backbone, "max_length": 2048,
                                                                      "batch_size": 64, "micro_batch_size": 2}})
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: type("Props", (), {"total_memory": 80 * GIB})())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the compute resource's own check passes
    result = materialize([reward_model], partition_key="baseline", instance=DagsterInstance.ephemeral(),
                         resources=build_resources(settings), raise_on_error=False)
    assert not result.success
    failure = result.get_step_failure_events()[0].step_failure_data.error
    assert "reward model 'baseline' not launched: the training plan needs" in failure.message
    assert "training.strategy: fsdp" in failure.message
