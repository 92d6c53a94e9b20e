"""Peak memory of a training stage, estimated from the model's shape before anything loads.

`align plan` reads the base model's `config.json` (no weights) and prints, per stage, what the run will
hold at its peak, so a recipe that cannot fit is caught before minutes of loading. The estimate adds:

- runtime: the Python process with torch, transformers, peft, trl and datasets imported (`RUNTIME_MB`,
  measured once: ~480 MB RSS on Linux/CPU, torch 2.x, transformers 5);
- weights: every parameter at its stored width (fp32 4 bytes, bf16 2, 4-bit ~0.5 for block linears plus
  bf16 embeddings); a second copy where the stage keeps one (DPO `reference: copy`, full PPO's reference);
- trainable state: LoRA matrices (or the unfrozen weights of full fine-tuning) with fp32 gradients and two
  Adam moments: 16 bytes a parameter;
- activations: what autograd keeps per token and per block for the backward pass, counted from the block's
  tensors (RMSNorm inputs, the inputs each linear and LoRA branch saves, attention q/k/v/output, the MLP's
  three intermediates), at 2 bytes under bf16 autocast (plus the fp32 casts it makes) or 4 in fp32; blocks
  below the lowest trainable one keep nothing;
- the language-model head and loss: bf16/fp32 logits, their fp32 copy, log-softmax and its gradient,
  (a + 12) bytes per vocabulary entry and token (causal-LM stages only);
- PPO's KV cache for a rollout batch.

Tokens per step are `batch x sequence` (pairs count twice), with the sequence the longest the data holds
when the planner could tokenize it, else `max_length` (then an upper bound). Attention is taken as SDPA
without a materialized score matrix, as transformers uses on CPU and GPU, unless the stage sets
`attention: eager`, which keeps each trained block's T x T attention weights. The estimate is checked against a
measured run of the default model (tests/test_memory.py); it is a planning figure, not a guarantee: the
allocator's caching and fragmentation move a real peak by some percent either way.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

RUNTIME_MB = 480.0
MB = 2**20
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a decoder-only transformer (Llama-style: GQA attention, gated MLP)."""

    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool = True

    @classmethod
    def from_config(cls, config: dict) -> "Shape":
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        return cls(vocab=config["vocab_size"], hidden=hidden, layers=config["num_hidden_layers"],
                   intermediate=config.get("intermediate_size", 4 * hidden), heads=heads,
                   kv_heads=config.get("num_key_value_heads") or heads,
                   head_dim=config.get("head_dim") or hidden // heads,
                   tied=bool(config.get("tie_word_embeddings", False)))

    @classmethod
    def from_file(cls, path: str | Path) -> "Shape":
        return cls.from_config(json.loads(Path(path).read_text()))

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one block."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def block_params(self) -> int:
        return sum(a * b for a, b in self.linears().values()) + 2 * self.hidden

    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def params(self) -> int:
        return self.layers * self.block_params() + self.embedding_params() + self.hidden


@dataclass
class Estimate:
    """Peak memory in MB, by part."""

    parts: dict[str, float] = field(default_factory=dict)
    tokens: int = 0
    seq_len: int = 0
    seq_is_bound: bool = False

    @property
    def total_mb(self) -> float:
        return sum(self.parts.values())

    def describe(self) -> str:
        parts = ", ".join(f"{name} {value / 1024:.2f}" for name, value in self.parts.items() if value >= 0.5)
        seq = f"{'<= ' if self.seq_is_bound else ''}{self.seq_len} tokens"
        return (f"peak memory ~{self.total_mb / 1024:.1f} GB ({parts} GB; {self.tokens} tokens a micro-batch, "
                f"{seq} each)")


def lora_targets(targets) -> tuple[str, ...]:
    """The block linears a LoRA `targets` setting adapts (`all-linear` = all seven)."""
    if targets == "all-linear" or targets is None:
        return BLOCK_LINEARS
    return tuple(name for name in BLOCK_LINEARS if any(str(t).endswith(name) for t in targets))


def lora_params(shape: Shape, r: int, targets, trained_layers: int) -> int:
    linears = shape.linears()
    return trained_layers * sum(r * (linears[name][0] + linears[name][1]) for name in lora_targets(targets))


def activation_bytes_per_token(shape: Shape, *, act_bytes: int, casts: bool, adapted: tuple[str, ...],
                               dropout: bool) -> int:
    """Bytes autograd keeps for one token in one trainable block.

    Under bf16 autocast a linear fed an fp32 tensor saves its own bf16 cast of it (2 bytes); in fp32 it saves
    the input itself, which is already counted where that tensor was made. A LoRA branch adds its dropout mask
    (1 byte) and the input its A matrix saves (a new tensor when dropout or a cast makes one)."""
    h, i = shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    a = act_bytes
    linears = shape.linears()
    fp32_fed = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}  # fed by an RMSNorm output (fp32)
    total = 2 * 8 * h  # two RMSNorms: fp32 input and normalized output
    total += a * (2 * q + 2 * kv)  # SDPA keeps q, k, v and its output
    total += 3 * a * i  # SiLU input, its output and the up projection, kept by the product
    for name, (d_in, _) in linears.items():
        cast = casts and name in fp32_fed
        total += 2 * d_in if cast else 0  # the base layer's own bf16 copy of its input
        if name in adapted:
            if dropout:
                total += d_in + a * d_in  # mask, and the dropped-out input lora_A keeps
            elif cast:
                total += 2 * d_in  # lora_A casts the fp32 input again
    return total


def estimate(shape: Shape, *, rows_per_example: int = 1, lm_head: bool = True, method: str = "lora",
             lora_r: int = 16, lora_targets_=None,
             lora_dropout: float = 0.0, freeze_layers: int = 0, weight_bytes: float = 4.0, autocast: bool = False,
             batch: int = 8, seq_len: int = 256, seq_is_bound: bool = False, reference_copy: bool = False,
             rollout_batch: int = 0, eager_attention: bool = False, runtime_mb: float = RUNTIME_MB) -> Estimate:
    """The peak of one training stage; see the module docstring for what each part counts. `rows_per_example`:
    sequences per training item (2 for preference pairs); `lm_head`: whether the LM head's logits are computed
    (not for a reward model's score head); `rollout_batch`: sequences generated at once (their KV cache)."""
    trained_layers = max(shape.layers - freeze_layers, 0)
    params = shape.params()
    if method == "qlora":  # 4-bit block linears (with their quantization constants), bf16 embeddings and norms
        weights = shape.layers * shape.block_params() * 0.53 + (shape.embedding_params() + shape.hidden) * 2
    else:
        weights = params * weight_bytes
    if method == "full":
        trainable = trained_layers * shape.block_params() + (shape.embedding_params() if freeze_layers == 0 else 0)
    else:
        trainable = lora_params(shape, lora_r, lora_targets_, trained_layers)
    rows = batch * rows_per_example
    tokens = rows * seq_len
    adapted = lora_targets(lora_targets_) if method != "full" else ()
    a = 2 if autocast or weight_bytes == 2 else 4
    per_token = trained_layers * activation_bytes_per_token(shape, act_bytes=a, casts=autocast, adapted=adapted,
                                                             dropout=lora_dropout > 0)
    parts = {"runtime": runtime_mb, "weights": weights / MB}
    if reference_copy:
        parts["reference"] = weights / MB
    parts["trainable"] = trainable * 16 / MB
    parts["activations"] = tokens * per_token / MB
    if eager_attention:  # softmax output (fp32) and its cast for the value matmul, per head: T x T a row
        parts["attention_weights"] = trained_layers * rows * shape.heads * seq_len ** 2 * (4 + a) / MB
    if lm_head:
        parts["logits"] = tokens * (a + 12) * shape.vocab / MB
    if autocast:  # the largest weight cast to bf16 for one matmul (the tied LM head / embedding)
        parts["casts"] = shape.vocab * shape.hidden * 2 / MB
    if rollout_batch:
        parts["kv_cache"] = rollout_batch * seq_len * shape.layers * 2 * shape.kv_heads * shape.head_dim * a / MB
    return Estimate(parts=parts, tokens=tokens, seq_len=seq_len, seq_is_bound=seq_is_bound)


def estimate_stage(shape: Shape, cfg, *, seq_len: int | None = None, autocast: bool | None = None) -> Estimate:
    """The estimate for a stage's typed config (`align.config.recipe` stage): its method, LoRA, quantization, batch,
    sequence length (`seq_len` = the longest row the data holds, when known; else `max_length`) and the
    precision `align.runtime.precision` resolves for it on this machine (`autocast` overrides that rule)."""
    from align.runtime.precision import stage_precision
    from align.stages import stage_class

    precision = stage_precision(cfg)
    if autocast is None:
        autocast = precision.autocast is not None

    stage = stage_class(cfg.kind)
    bound = seq_len is None
    seq = stage.memory_sequence_length(cfg, seq_len)
    weight_bytes = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0}[precision.weights]
    batch = cfg.batch_size
    budget = stage.pass_token_budget(cfg)
    rows_per_example = stage.rows_per_example
    if budget and rows_per_example * batch * seq > budget:  # the biggest of several passes
        batch = math.ceil(batch / min(batch, math.ceil(rows_per_example * batch * seq / budget)))
    return estimate(shape, rows_per_example=rows_per_example, lm_head=stage.lm_head, method=cfg.method,
                    lora_r=cfg.lora.r, lora_targets_=cfg.lora.targets, lora_dropout=cfg.lora.dropout,
                    freeze_layers=cfg.freeze_layers, weight_bytes=weight_bytes,
                    autocast=autocast and weight_bytes == 4.0, batch=batch, seq_len=seq, seq_is_bound=bound,
                    reference_copy=stage.keeps_reference_copy(cfg), rollout_batch=stage.generated_at_once(cfg),
                    eager_attention=cfg.attention == "eager")
