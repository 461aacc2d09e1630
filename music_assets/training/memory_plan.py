"""A memory plan before launch: what one training rank holds on its GPU, and whether that fits.

`plan_memory(config, options, training, gpu_memory_gib)` reads the backbone's Hugging Face config
(an `AutoConfig`, a dict with `model_type`, or a model folder: only `config.json` is read, never the
weights), the recipe (`TrainConfig`: precision, max_length, micro_batch_size, gradient_checkpointing)
and the launch (`TrainingConfig`: processes, strategy). Everything is bytes per rank. Notation:
h hidden size, L layers, a attention heads, d head_dim, q = a·d, kv = num_key_value_heads·d,
I intermediate size, V vocabulary, N = processes, s = max_length, b = 2·micro_batch_size (one
forward pass scores the chosen and the rejected side of `micro_batch_size` pairs), t = s·b tokens.

Parameters (exact; tests compare them with the model built on the meta device)
  The reward model is `AutoModelForSequenceClassification` with one label: the backbone, no LM head
  (so `tie_word_embeddings` changes nothing here: the embedding matrix counts once either way; an
  untied causal LM would add V·h), and a bias-free `score` head h -> 1.
  decoder layer (Llama, SmolLM2, Mistral, Qwen2, Qwen3, Gemma, Gemma-2):
      attention h·q + 2·h·kv + q·h  (grouped-query K/V: kv = num_key_value_heads·d)
                + q + 2·kv (+ h) biases where the config has them (Qwen2: q/k/v; `attention_bias`: all four)
                + 2·d for Qwen3's per-head q/k norms
      MLP       3·h·I (gate, up, down; + 2·I + h with `mlp_bias`)
      norms     h per RMSNorm: 2 per layer, 4 for Gemma-2 (pre/post attention and feed-forward)
  root (everything outside the layers): V·h embeddings + h final norm + h score head.
  encoder (BERT, MiniLM): layer 4·(h² + h) + 2·h·I + I + h + 2·2·h (two LayerNorms);
      root (V + max_position_embeddings + type_vocab_size)·h + 2·h (embedding LayerNorm)
      + h² + h (pooler) + h + 1 (the classifier, with bias).
  P = L·P_layer + P_root.

Bytes per parameter (AdamW keeps two moments, exp_avg and exp_avg_sq, in the parameters' dtype)
  fp32       4 params + 4 grads + 8 optimizer = 16 B/param; fp32 compute.
  bf16       mixed: 4 + 4 + 8 = 16 B/param (fp32 master weights and optimizer state), bf16 compute.
  bf16-pure  2 + 2 + 4 = 8 B/param: weights, gradients and both moments in bf16.
  auto       bf16 where the hardware has it (every GPU the plan is for), else fp32.

Strategy
  ddp   a full replica per rank: params P·w, grads P·w, optimizer 2·P·w (w: 4, or 2 for bf16-pure).
        DDP also packs gradients into communication buckets of the same total size; they are
        counted once, as with `gradient_as_bucket_view=True` (with the default `False` DDP keeps a
        second copy, P·w more). One process runs without DDP and without buckets.
  fsdp  FSDP2 `fully_shard` per layer plus the root: params, grads and optimizer state divided by N,
        plus what is gathered unsharded: the root unit (kept unsharded through the step) and two
        layers (the one computing and the one prefetched) in params, and the larger of the root and
        a layer in unsharded grads before their reduce-scatter, all at the compute width (bf16 under
        `bf16`: FSDP2's MixedPrecisionPolicy casts the gathered weights, so there is no autocast).

Activations per rank, one micro-batch (an estimate of the tensors autograd keeps for backward)
  Derived from what PyTorch saves for Hugging Face's implementations, not from Korthikanti et al.
  (2022)'s 34·s·b·h + 5·a·s²·b, which assumes a GPT block (LayerNorm, a 4h GELU MLP, dropout masks,
  16-bit everything) and undercounts a gated MLP and RMSNorms that upcast to fp32 (Gemma-2-9B in
  bf16: 278 KiB per token and layer here, 119 KiB there). Checked in tests/training/test_memory_plan.py
  against the bytes `saved_tensors_hooks` sees in small Llama, Gemma-2, Qwen3 and BERT models, for
  every precision and both attention kinds: from 3% under to 16% over (it errs high: Llama's norm
  keeps its normalized output in bf16 under bf16-pure, counted here in fp32). Per token and layer,
  with e the compute width (2 for bf16, 4 for fp32):
      norms      decoder: 8·h per RMSNorm (its input and normalized output, kept in fp32);
                 encoder: h·w per LayerNorm input (w = 4, or 2 for bf16 weights)
      copies     e·h per linear input: the pre-norm outputs; autocast (DDP under `bf16`) casts the
                 input of each linear separately (3 for q/k/v, 2 for gate/up), otherwise one each
      attention  SDPA/flash: 5·q·e (q, k, v with K/V repeated to all heads as transformers does
                 under a padding mask, the attention output, the o_proj input); the s² scores
                 never materialize. Eager: 4·q·e (q, k, v, o_proj input) + 4·a·s for the softmax
                 kept in fp32 + a·s·e more for its bf16 copy when e = 2 (an encoder in bf16-pure
                 keeps only a·s·e) + a·s·e for Gemma-2's logit soft-capping. Qwen3's per-head q/k
                 norms add (4 + e)·(q + kv).
                 The attention kind is the config's `attn_implementation`; unset means SDPA, what
                 transformers picks and `load_backbone` keeps.
      MLP        4·I·e gated (gate, up, act(gate), act·up); 2·I·e plain (fc1 output, act output).
  plus, once: the final norm (8·h + e·h per token), the 4-D padding mask b·s²·e per attention kind
  (Gemma-2's sliding and full layers have one each), and under autocast the bf16 casts of the
  layers' weights, 2·L·P_layer, which the autocast cache holds for the whole forward pass.
  Without gradient checkpointing: L·t·layer + outside. With it (each layer recomputed in backward):
  t·h·r per layer boundary (r the residual stream's width: 4, or 2 with bf16 weights or FSDP's bf16
  inputs) for L layers, plus one layer's full activations, plus outside.
  Not counted (the margin below covers them): activation gradients in flight, the score logits,
  rotary tables, per-row statistics (a few bytes per token), the cuBLAS/NCCL workspaces.

Fits: total <= capacity - margin, margin = 2 GiB + 5% of capacity. The 2 GiB are the CUDA context
(0.5-1 GiB with the cuBLAS/cuDNN handles) and the NCCL communicators and buffers (a few hundred MiB
to 1 GiB), neither of which the caching allocator sees; 5% covers the allocator's fragmentation and
the transient tensors above. On an 80 GiB GPU that is 6 GiB, leaving 74 GiB for the plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from music_assets.training.config import TrainConfig, TrainingConfig

GIB = 1024**3
MARGIN_FIXED = 2 * GIB
MARGIN_SHARE = 0.05

DECODERS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")
ENCODERS = ("bert",)

# Published configs of hub models a plan may be asked about offline (the paper's backbone), as the
# model cards' config.json gives them. A local folder or the Hugging Face cache wins over these.
_GEMMA2_9B = {"model_type": "gemma2", "hidden_size": 3584, "num_hidden_layers": 42, "num_attention_heads": 16,
              "num_key_value_heads": 8, "head_dim": 256, "intermediate_size": 14336, "vocab_size": 256000,
              "tie_word_embeddings": True, "sliding_window": 4096, "attn_logit_softcapping": 50.0,
              "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 256, "max_position_embeddings": 8192}
PUBLISHED_CONFIGS = {"google/gemma-2-9b": _GEMMA2_9B, "google/gemma-2-9b-it": _GEMMA2_9B}


class UnsupportedArchitecture(ValueError):
    """A backbone whose parameter and activation formulas this module does not know."""


@dataclass(frozen=True)
class Shape:
    """The dimensions of a backbone that the plan reads from its config."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    norms_per_layer: int
    gated_mlp: bool
    encoder: bool
    layer_params: int  # one layer (all layers are the same size)
    root_params: int  # embeddings, final norm / pooler, reward head: FSDP's root unit
    attention: str  # the attn_implementation: "eager" materializes the s x s scores, others do not
    softcap: bool  # Gemma-2's attention-logit soft-capping (one more s x s tensor under eager)
    mask_kinds: int  # distinct attention masks (Gemma-2: sliding and full)

    @property
    def parameters(self) -> int:
        return self.layers * self.layer_params + self.root_params


def as_config(config):
    """A `PretrainedConfig` from a config object, a dict with `model_type`, or a folder / config.json."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config
    if isinstance(config, dict):
        fields = dict(config)
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    path = Path(config).expanduser()
    return AutoConfig.from_pretrained(path.parent if path.name == "config.json" else path)


def shape_of(config) -> Shape:
    """The backbone's `Shape`; an architecture outside DECODERS and ENCODERS is refused."""
    c = as_config(config)
    kind = c.model_type
    if kind not in DECODERS + ENCODERS:
        raise UnsupportedArchitecture(
            f"no memory formulas for model_type {kind!r}; known: {', '.join(DECODERS + ENCODERS)}")
    h, heads = c.hidden_size, c.num_attention_heads
    d = getattr(c, "head_dim", None) or h // heads
    attention = getattr(c, "_attn_implementation", None) or "sdpa"
    if kind in ENCODERS:
        layer = 4 * (h * h + h) + 2 * h * c.intermediate_size + c.intermediate_size + h + 4 * h
        root = (c.vocab_size + c.max_position_embeddings + c.type_vocab_size) * h + 2 * h + h * h + h + h + 1
        return Shape(kind, h, c.num_hidden_layers, heads, heads, d, c.intermediate_size, 2, False, True, layer, root,
                     attention, False, 1)
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    q, kv = heads * d, kv_heads * d
    norms = 4 if kind == "gemma2" else 2
    attn = 2 * h * q + 2 * h * kv
    if kind == "qwen2":
        attn += q + 2 * kv
    elif getattr(c, "attention_bias", False):
        attn += q + 2 * kv + h
    if kind == "qwen3":
        attn += 2 * d
    mlp = 3 * h * c.intermediate_size + (2 * c.intermediate_size + h if getattr(c, "mlp_bias", False) else 0)
    root = c.vocab_size * h + h + h
    mask_kinds = len(set(getattr(c, "layer_types", None) or ("full_attention",)))
    return Shape(kind, h, c.num_hidden_layers, heads, kv_heads, d, c.intermediate_size, norms, True, False,
                 attn + mlp + norms * h, root, attention, bool(getattr(c, "attn_logit_softcapping", None)), mask_kinds)


def parameter_count(config) -> int:
    """Parameters of the reward model (backbone + one-output head) built from `config`."""
    return shape_of(config).parameters


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per rank for one launch, and whether they fit one GPU."""

    shape: Shape
    precision: str  # fp32 | bf16 | bf16-pure (auto resolved)
    strategy: str
    processes: int
    parameters: int
    gradients: int
    optimizer: int
    activations: int
    capacity: int
    gradient_checkpointing: bool

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations

    @property
    def margin(self) -> int:
        return MARGIN_FIXED + int(MARGIN_SHARE * self.capacity)

    @property
    def usable(self) -> int:
        return self.capacity - self.margin

    @property
    def fits(self) -> bool:
        return self.total <= self.usable


def resolved_precision(precision: str, bf16_supported: bool = True) -> str:
    """`auto` as the trainer resolves it: bf16 where the hardware has it (every current GPU), else fp32."""
    if precision == "auto":
        return "bf16" if bf16_supported else "fp32"
    return precision


def plan_memory(config, options: TrainConfig, training: TrainingConfig, gpu_memory_gib: float, *,
                bf16_supported: bool = True) -> MemoryPlan:
    """The per-rank plan for `options` launched as `training` (processes, strategy) on GPUs of
    `gpu_memory_gib` GiB (formulas in the module docstring)."""
    shape = config if isinstance(config, Shape) else shape_of(config)
    precision = resolved_precision(options.precision, bf16_supported)
    width = 2 if precision == "bf16-pure" else 4  # parameters, gradients and moments
    compute = 4 if precision == "fp32" else 2
    n = training.processes
    P = shape.parameters
    params, grads, optimizer = P * width, P * width, 2 * P * width
    if training.strategy == "fsdp":
        params = math.ceil(P / n) * width + (shape.root_params + 2 * shape.layer_params) * compute
        grads = math.ceil(P / n) * width + max(shape.root_params, shape.layer_params) * compute
        optimizer = 2 * math.ceil(P / n) * width
    return MemoryPlan(shape, precision, training.strategy, n, params, grads, optimizer,
                      activation_bytes(shape, options, precision, training.strategy), int(gpu_memory_gib * GIB),
                      options.gradient_checkpointing)


def activation_bytes(shape: Shape, options: TrainConfig, precision: str, strategy: str) -> int:
    """Activation estimate for one micro-batch of `options.micro_batch_size` pairs (module docstring)."""
    s, b = options.max_length, 2 * options.micro_batch_size
    tokens = s * b
    e = 4 if precision == "fp32" else 2
    autocast = precision == "bf16" and strategy == "ddp"
    bf16_weights = precision == "bf16-pure" or (precision == "bf16" and strategy == "fsdp")
    h, q = shape.hidden, shape.heads * shape.head_dim
    if shape.encoder:
        norms = shape.norms_per_layer * h * (2 if bf16_weights else 4)
    else:
        norms = shape.norms_per_layer * 8 * h
    copies = e * h * ((3 + (2 if shape.gated_mlp else 1)) if autocast else 2)
    if shape.attention == "eager":  # softmax in fp32 plus its bf16 copy; an encoder in bf16 keeps one bf16 copy
        softmax = e if shape.encoder and bf16_weights else 4 + (e if e == 2 else 0)
        attention = 4 * q * e + shape.heads * s * (softmax + (e if shape.softcap else 0))
    else:
        attention = 5 * q * e
    if shape.model_type == "qwen3":  # RMSNorms on q and k per head: the fp32 input, the normalized output
        attention += (4 + e) * (q + shape.kv_heads * shape.head_dim)
    mlp = (4 if shape.gated_mlp else 2) * shape.intermediate * e
    layer = tokens * (norms + copies + attention + mlp)
    final = (2 * h if shape.encoder else 8 * h + e * h) * tokens
    outside = final + shape.mask_kinds * b * s * s * e
    outside += 2 * shape.layers * shape.layer_params if autocast else 0
    if options.gradient_checkpointing:
        return shape.layers * tokens * h * (2 if bf16_weights else 4) + layer + outside
    return shape.layers * layer + outside


def backbone_config(name: str, attn_implementation: str | None = None):
    """The backbone's `AutoConfig`, reading only config.json: a local folder or builtin model (built once),
    the Hugging Face cache, a published config from PUBLISHED_CONFIGS, else the hub (config.json only);
    with the attention the compute resource asks for (`compute.attn_implementation`), if any."""
    config = _read_backbone_config(name)
    if attn_implementation:
        config._attn_implementation = attn_implementation
    return config


def _read_backbone_config(name: str):
    from transformers import AutoConfig

    from music_assets.model_provisioning import resolve_model
    from music_assets.training.train_rm import resolve_backbone

    try:
        return AutoConfig.from_pretrained(resolve_model(name), local_files_only=True)
    except OSError:
        pass
    if name in PUBLISHED_CONFIGS:
        return as_config(PUBLISHED_CONFIGS[name])
    return AutoConfig.from_pretrained(resolve_backbone(name))


def plan_training(training: TrainingConfig, gpu_memory_gib: float, *, bf16_supported: bool = True,
                  attn_implementation: str | None = None) -> MemoryPlan:
    """The plan for a training section as configured (its backbone's config read as above)."""
    return plan_memory(backbone_config(training.options.backbone, attn_implementation), training.options, training,
                       gpu_memory_gib, bf16_supported=bf16_supported)


def launch_refusal(training: TrainingConfig, gpu_memory_gib: float, *, bf16_supported: bool = True,
                   attn_implementation: str | None = None, warn=print) -> str | None:
    """`reward_model`'s check before a GPU launch: why the configured plan cannot fit, or None. A backbone
    whose formulas this module does not know is let through with a warning: the launch itself will tell."""
    try:
        plan = plan_training(training, gpu_memory_gib, bf16_supported=bf16_supported,
                             attn_implementation=attn_implementation)
    except UnsupportedArchitecture as exc:
        warn(f"no memory plan before launch: {exc}")
        return None
    return refusal(plan)


def refusal(plan: MemoryPlan) -> str | None:
    """Why a launch cannot fit, with the totals and what would shrink it; None when it fits."""
    if plan.fits:
        return None
    hints = []
    if plan.strategy == "ddp":
        hints.append("training.strategy: fsdp (shards parameters, gradients and optimizer state)")
    if plan.precision != "bf16-pure":
        hints.append("training.options.precision: bf16-pure (half the parameter and optimizer memory)")
    if not plan.gradient_checkpointing:
        hints.append("training.options.gradient_checkpointing: true (activations of one layer, not all)")
    hints.append("a smaller training.options.micro_batch_size or max_length (activations)")
    return (f"the training plan needs {gib(plan.total)} per GPU (parameters {gib(plan.parameters)}, gradients "
            f"{gib(plan.gradients)}, optimizer state {gib(plan.optimizer)}, activations {gib(plan.activations)}) "
            f"but a {gib(plan.capacity)} GPU leaves {gib(plan.usable)} after the {gib(plan.margin)} margin "
            f"({plan.strategy}, {plan.processes} process(es), {plan.precision}); try "
            + "; ".join(hints))


def gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def render(plans: list[MemoryPlan], options: TrainConfig) -> str:
    """Plans of one recipe side by side, one column each: bytes per rank, capacity and the verdict."""
    shape = plans[0].shape
    lines = [f"backbone {options.backbone}: {shape.model_type}, {shape.parameters:,} parameters "
             f"({shape.layers} layers of {shape.layer_params:,}, root {shape.root_params:,}), {shape.attention} attention",
             f"recipe: max_length {options.max_length}, micro-batch {options.micro_batch_size} pairs "
             f"({2 * options.micro_batch_size} sequences), gradient checkpointing "
             f"{'on' if options.gradient_checkpointing else 'off'}",
             f"{'per rank':<16}" + "".join(f"{f'{p.strategy} x {p.processes}, {p.precision}':>22}" for p in plans)]
    rows = [("parameters", "parameters"), ("gradients", "gradients"), ("optimizer state", "optimizer"),
            ("activations", "activations"), ("total", "total"), ("capacity", "capacity"), ("usable", "usable")]
    lines += [f"{label:<16}" + "".join(f"{gib(getattr(p, field)):>22}" for p in plans) for label, field in rows]
    lines.append(f"{'verdict':<16}" + "".join(f"{'FITS' if p.fits else 'DOES NOT FIT':>22}" for p in plans))
    lines.append(f"usable = capacity - {gib(MARGIN_FIXED)} - {MARGIN_SHARE:.0%} (CUDA context, NCCL, fragmentation); "
                 "activations are an estimate (music_assets/training/memory_plan.py)")
    return "\n".join(lines)
