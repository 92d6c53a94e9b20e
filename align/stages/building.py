"""The stage's tokenizer (checked against its parent's) and its model (full, LoRA or QLoRA on the parent).
"""

from __future__ import annotations

import logging

from align.errors import TrainingError
from align.models.loading import load_tokenizer
from align.registry.fingerprint import tokenizer_facts
from align.runtime.precision import mark, stage_precision
from align.stages.context import StageContext

log = logging.getLogger(__name__)


def read_chat_template(value: str, recipe) -> str:
    """A recipe's `chat_template`: template text (it holds `{{` or `{%`), else a path to a file with it."""
    if "{{" in value or "{%" in value:
        return value
    path = recipe.resolve_path(value)
    if not path.is_file():
        raise TrainingError(f"chat_template: {value} is neither a template nor a readable file")
    return path.read_text()


def stage_tokenizer(ctx: StageContext, may_set_template: bool | None = None):
    """The parent's tokenizer, with the stage's `chat_template` if it sets one and pad defaulting to EOS.

    Stages after SFT must tokenize exactly as their parent was trained: the tokenizer and chat-template
    hashes are compared with what the parent's manifest recorded (or, for a model outside the registry,
    with its own tokenizer), and a difference is refused, naming both hashes, unless the stage says
    `allow_template_mismatch: true`. SFT may set a new template: that is where a template is chosen
    (`Stage.may_set_chat_template`)."""
    cfg = ctx.config
    if may_set_template is None:
        from align.stages import stage_class

        may_set_template = stage_class(cfg.kind).may_set_chat_template
    tokenizer = load_tokenizer(ctx.parent, ctx.registry)
    entry = ctx.parent.entry
    expected = (entry.manifest.get("tokenizer") if entry is not None else None) or tokenizer_facts(tokenizer)
    if cfg.chat_template is not None:
        tokenizer.chat_template = read_chat_template(cfg.chat_template, ctx.recipe)
    actual = tokenizer_facts(tokenizer)
    differs = [what for what in ("hash", "chat_template_hash") if expected.get(what) != actual.get(what)]
    if differs and not may_set_template:
        message = (f"stages.{ctx.name}: the tokenizer this stage would use differs from its parent "
                   f"{ctx.parent.describe()}: tokenizer hash {expected.get('hash')} (parent) vs {actual['hash']} "
                   f"(this stage), chat-template hash {expected.get('chat_template_hash')} (parent) vs "
                   f"{actual['chat_template_hash']} (this stage)")
        if not cfg.allow_template_mismatch:
            raise TrainingError(message + ". Token ids or turn markers would not mean what the parent learned; "
                                "use the parent's template, or set allow_template_mismatch: true.")
        log.warning("%s; going on because allow_template_mismatch is set", message)
    elif differs:
        log.info("stages.%s: chat template %s replaces the parent's %s", ctx.name, actual["chat_template_hash"],
                 expected.get("chat_template_hash"))
    return tokenizer


def check_trainable(ctx: StageContext, model) -> tuple[int, int]:
    """(trainable, total) parameters of the stage's model, refused when none would train: such a run fails at
    its first backward pass, or (PPO) registers an untouched copy of its parent as a trained entry."""
    from align.models.loading import count_parameters

    trainable, total = count_parameters(model)
    if trainable == 0:
        raise TrainingError(f"stages.{ctx.name}: method {ctx.config.method} on {ctx.parent.describe()} leaves 0 of "
                            f"{total:,} parameters trainable, so there is nothing to train and nothing is registered")
    return trainable, total


def build_policy(ctx: StageContext, tokenizer):
    """A causal LM on the parent's weights: see `build_model`. Shared by SFT, DPO and PPO."""
    return build_model(ctx, tokenizer, head="lm")


def build_model(ctx: StageContext, tokenizer, head: str = "lm"):
    """The stage's model on the parent's weights (adapter parents merged in full precision first, then
    quantized for QLoRA): a causal LM (`head="lm"`) or a one-output sequence classifier (`head="score"`, the
    reward model, whose score head trains fully as a PEFT `modules_to_save` module), with a fresh LoRA
    adapter or, for full fine-tuning, the bottom `freeze_layers` blocks frozen. Returns (model, LoRA config
    or None)."""
    from align.models.loading import (
        bnb_config,
        freeze_bottom,
        load_causal_lm,
        load_sequence_classifier,
        lora_config,
        use_attention,
    )

    cfg = ctx.config
    precision = stage_precision(cfg)
    log.info("stages.%s precision: %s", ctx.name, precision.describe())
    quant = bnb_config(cfg) if cfg.method == "qlora" else None
    if head == "score":
        model = load_sequence_classifier(ctx.parent, ctx.registry, dtype=precision.weights, quantization=quant,
                                         pad_token_id=tokenizer.pad_token_id)
        lora_kwargs = {"task_type": "SEQ_CLS", "modules_to_save": ["score"]}
    else:
        model = load_causal_lm(ctx.parent, ctx.registry, dtype=precision.weights, quantization=quant)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        lora_kwargs = {}
    model = use_attention(model, cfg.attention)
    if cfg.method == "full":
        freeze_bottom(model, cfg.freeze_layers)
        return mark(model, precision), None
    from peft import get_peft_model, prepare_model_for_kbit_training

    if cfg.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_cfg = lora_config(cfg.lora, model=model, freeze_layers=cfg.freeze_layers, **lora_kwargs)
    return mark(get_peft_model(model, peft_cfg), precision), peft_cfg


def lora_targets(peft_cfg) -> str | list[str] | None:
    """The modules a LoRA config adapts, as the manifest records them (sorted names, or `all-linear`)."""
    if peft_cfg is None:
        return None
    targets = peft_cfg.target_modules
    return targets if isinstance(targets, str) else sorted(targets)
