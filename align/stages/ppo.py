"""PPO stage: RL from a policy entry against reward models, verifiable checkers, or a weighted mix.

Why it is built this way:
- One base copy: the policy is the parent's weights plus a LoRA adapter (or QLoRA, or full weights); the
  reference is the same weights with the adapter disabled (full fine-tuning keeps a frozen copy); the
  critic, for `estimator: gae`, is a value head on the policy trunk. `grpo` and `rloo` need no critic.
- The loop (`align.rl.ppo`) is our own: TRL no longer ships PPO. Each step is sample -> score -> update,
  with the time split between them logged, so a slow stage says where its time goes.
- Rewards come from `align.rewards.mix`: reward-model entries (refused at plan time, and again here, when
  they failed their quality gate, unless `allow_failed_gate`) and named checkers with their arguments.
- Held-out prompts (`eval_prompts`, else `eval_split` of the prompts) are scored before and after training
  with greedy decoding, so the manifest says whether the reward rose, and by how much KL it was bought.
- Resumable: a checkpoint (written whole, then renamed into place) holds the trainable weights, value
  head, optimizer, scheduler, KL controller, reward normalizer and the history; the sampling seed of
  each step is derived from the recipe seed and the step, so a resumed run draws the same samples.
- Several processes (`align run --nproc N`): each takes its own 1/N of every step's prompts; the trainer
  sums gradients and pools the figures over processes (`align.runtime.distributed`), so `rollout_batch` and
  `minibatch` keep their single-process meaning; the main process alone measures, checkpoints and registers.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch

from align.runtime import distributed
from align.data.prepare import DataReport, heldout_split
from align.data.prompts import load_prompts
from align.data.tokenize import encode_prompt
from align.runtime.diskspace import disk_guard
from align.errors import RegistryError, TrainingError
from align.eval.hook import evaluate_model
from align.eval.plots import reward_histogram_png, rl_curves_png
from align.registry.store import write_json_atomic
from align.rewards.checkers import fields_needed
from align.rewards.mix import RewardMix, checker_term, reward_model_term, term_names
from align.rl.ppo import PPOTrainer
from align.rl.rollout import sample_rollouts
from align.stages.resume import checkpoint_bytes, free_space_hint
from align.runtime.precision import stage_precision
from align.stages.base import (StageContext, StopRequest, baseline_record, build_policy, check_trainable, lora_targets,
                               peak_rss_mb, record_world_size, register_entry, start_run)

log = logging.getLogger(__name__)
STATE_FILE = "state.pt"


# ------------------------------------------------------------------------------------------ data


def checker_needs(cfg) -> dict[str, tuple[str, ...]]:
    """The prompt-row fields the stage's checkers read."""
    return fields_needed(s.checker for s in cfg.rewards if s.checker is not None)


def prepare_prompts(ctx: StageContext, tokenizer) -> tuple[list[dict], list[dict], DataReport]:
    """Training and held-out prompt rows, each with its prompt ids (`prompt_ids`). Prompts too long to leave
    room for `generation.max_new_tokens` within `max_length` are dropped and counted."""
    cfg = ctx.config
    needs = checker_needs(cfg)
    prompts = load_prompts(ctx.recipe, cfg.prompts, needs)
    report = DataReport(source=prompts.source, fingerprint=prompts.fingerprint, rows=len(prompts))
    budget = cfg.max_length - cfg.generation.max_new_tokens
    rows = []
    for row in prompts.rows:
        ids = encode_prompt(tokenizer, row["messages"])
        if len(ids) > budget:
            report.dropped["prompt longer than max_length - max_new_tokens"] += 1
            report.examples.append(f"{prompts.source}: row {row['row']}: prompt of {len(ids)} tokens")
            continue
        rows.append({**row, "prompt_ids": ids})
    report.kept = len(rows)
    if not rows:
        raise TrainingError(f"{prompts.source}: no prompt fits in max_length {cfg.max_length} with "
                            f"max_new_tokens {cfg.generation.max_new_tokens}")
    if cfg.eval_prompts is not None:
        held = load_prompts(ctx.recipe, cfg.eval_prompts, needs, limit=cfg.eval_limit)
        heldout = [{**r, "prompt_ids": encode_prompt(tokenizer, r["messages"])} for r in held.rows]
        return rows, heldout, report
    train_index, held_index = heldout_split(len(rows), cfg.eval_split, cfg.seed)
    return [rows[i] for i in train_index], [rows[i] for i in held_index][: cfg.eval_limit], report


def step_rows(rows: list[dict], step: int, prompts_per_step: int, samples: int, seed: int) -> list[dict]:
    """The prompts of step `step` (each repeated `samples` times, consecutively): a seeded permutation per
    pass over the data, so the order is fixed by seed and step alone (exact on resume)."""
    out = []
    for position in range(step * prompts_per_step, (step + 1) * prompts_per_step):
        epoch, offset = divmod(position, len(rows))
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
        out += [rows[order[offset]]] * samples
    return out


# ------------------------------------------------------------------------------------------ rewards


def reward_entry(ctx: StageContext, ref: str):
    """The registry entry a reward source names: an earlier stage of this recipe, or any model ref; refused
    when it is not a reward model or failed its quality gate (unless `allow_failed_gate`)."""
    from align.models.loading import resolve_model_ref
    from align.rewards.scoring import gate_problem, reward_problem

    name = ref[1:] if ref.startswith("@") else ref
    if name in ctx.recipe.stages:
        entry = ctx.registry.find(f"{ctx.recipe.name}/{name}")
        if entry is None:
            raise RegistryError(f"stages.{ctx.name}.rewards: stage {name!r} has no registry entry yet; run it first")
        ref = entry.ref
    source = resolve_model_ref(ref, ctx.registry)
    why = reward_problem(source) or (None if ctx.config.allow_failed_gate else gate_problem(source))
    if why:
        raise RegistryError(f"stages.{ctx.name}.rewards: {why}")
    return source


def build_rewards(ctx: StageContext) -> tuple[RewardMix, list[dict]]:
    """The reward mix of the recipe, reward models loaded; and how the manifest records each source."""
    from align.rewards.scoring import load_reward_model

    cfg = ctx.config
    terms, recorded = [], []
    for name, source in zip(term_names(cfg.rewards), cfg.rewards):
        if source.checker is not None:
            terms.append(checker_term(source.checker, source.weight, source.args))
            recorded.append({"name": name, "checker": source.checker, "args": source.args, "weight": source.weight})
            continue
        model_source = reward_entry(ctx, source.model)
        model, tokenizer = load_reward_model(model_source, ctx.registry)
        if torch.cuda.is_available():
            model.to(distributed.device())
        terms.append(reward_model_term(name, source.weight, model, tokenizer, cfg.batch_size * 2, cfg.max_length))
        recorded.append({"name": name, "model": model_source.lineage(), "weight": source.weight})
    return RewardMix(terms, normalize=cfg.reward_normalize, clip=cfg.reward_clip), recorded


# ------------------------------------------------------------------------------------------ held-out


@torch.no_grad()
def heldout_figures(trainer: PPOTrainer, rows: list[dict], reference=None) -> tuple[dict, list[float]]:
    """Greedy responses to the held-out prompts, scored by the reward mix (raw: no normalization), and the
    per-token KL to the reference of sampled responses. From the policy, or from `reference` when given
    (the parent, before training: KL 0 by definition). Returns (figures, per-prompt rewards)."""
    if not rows:
        return {}, []
    cfg = trainer.cfg
    model = trainer.model if reference is None else reference
    greedy = cfg.generation.model_copy(update={"temperature": 0.0})
    ids = [r["prompt_ids"] for r in rows]
    rollouts = sample_rollouts(model, trainer.tokenizer, rows, ids, greedy, cfg.rollout_batch)
    total, per_source = trainer.rewards.raw(rows, rollouts.texts)
    figures = {"reward": float(total.mean()), **{f"reward/{k}": float(v.mean()) for k, v in per_source.items()},
               "eos_rate": float(rollouts.ended.float().mean()),
               "response_length": float(rollouts.mask.sum(dim=1).float().mean()), "prompts": len(rows),
               "kl_per_token": 0.0}
    if reference is None:  # exact over the vocabulary on sampled responses: never negative, unlike k1
        sampled = sample_rollouts(model, trainer.tokenizer, rows, ids, cfg.generation, cfg.rollout_batch)
        figures["kl_per_token"] = trainer.exact_kl(model, sampled)
    return figures, total.tolist()


@distributed.main_only
def parent_heldout(ctx: StageContext, trainer: PPOTrainer, rows: list[dict]) -> tuple[dict, list[float], dict]:
    """The parent's held-out figures and its evaluation-hook metrics (the same hook the stage's entry gets),
    measured once per run: cached in the run folder, so a resumed run compares against the same numbers."""
    path = ctx.run_dir / "heldout_before.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        ctx.budget.reserve(saved.get("seconds", 0.0))  # the same measurement follows training: keep it its time
        return saved["figures"], saved["rewards"], saved["baseline"]
    log.info("measuring the parent on the held-out prompts and the evaluation hook")
    started = time.monotonic()
    with trainer.reference_model() as reference:
        figures, rewards = heldout_figures(trainer, rows, reference)
        baseline = evaluate_model(ctx.recipe, reference, trainer.tokenizer)
    seconds = time.monotonic() - started
    ctx.budget.reserve(seconds)
    write_json_atomic(path, {"figures": figures, "rewards": rewards, "baseline": baseline,
                             "seconds": round(seconds, 2)})
    return figures, rewards, baseline


# ------------------------------------------------------------------------------------------ checkpoints


@distributed.main_only  # every process holds the same weights and state
def save_checkpoint(ctx: StageContext, trainer: PPOTrainer, step: int, history: list[dict]) -> Path:
    """Write `checkpoint-<step>` whole under a temporary name, then rename it into place; keep the last two."""
    final = ctx.run_dir / f"checkpoint-{step}"
    partial = ctx.run_dir / f".checkpoint-{step}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    # A full disk is one error naming the checkpoint, its size and the intact previous one (`align.runtime.diskspace`).
    with disk_guard(final, lambda: checkpoint_bytes(ctx.run_dir, trainer.model),
                    lambda: free_space_hint(ctx.run_dir)):
        partial.mkdir(parents=True)
        torch.save(trainer.state_dict(), partial / STATE_FILE)
        record_world_size(partial, distributed.world_size())  # before trainer_state.json, which marks it complete
        (partial / "trainer_state.json").write_text(json.dumps({"global_step": step, "history": history}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    kept = sorted((p for p in ctx.run_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                  key=lambda p: int(p.name.split("-")[-1]))
    for old in kept[:-2]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(trainer: PPOTrainer, folder: Path) -> tuple[int, list[dict]]:
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
    trainer.load_state_dict(state)
    meta = json.loads((folder / "trainer_state.json").read_text())
    log.info("resuming from %s (step %d)", folder, meta["global_step"])
    return meta["global_step"], meta["history"]


# ------------------------------------------------------------------------------------------ run


def build_value_head(model):
    hidden = model.config.hidden_size
    head = torch.nn.Linear(hidden, 1)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return head.to(next(model.parameters()).device)


def per_process_config(cfg, stage: str, processes: int | None = None):
    """The config each process trains with: `rollout_batch` and `minibatch` are global (what one process
    does alone), so under n processes each takes 1/n of the step's prompts and of every minibatch. Refused,
    before any weights load, when they do not split evenly (`align run --nproc N` checks before launching)."""
    n = processes or distributed.world_size()
    if n == 1:
        return cfg
    prompts = cfg.rollout_batch // cfg.samples_per_prompt
    problems = []
    if prompts % n:
        problems.append(f"rollout_batch / samples_per_prompt = {prompts} prompts per step")
    if cfg.minibatch % (n * cfg.samples_per_prompt if cfg.estimator != "gae" else n):
        problems.append(f"minibatch {cfg.minibatch}")
    if problems:
        raise TrainingError(f"stages.{stage}: {' and '.join(problems)} must divide evenly among {n} processes"
                            + (f" (whole groups of samples_per_prompt {cfg.samples_per_prompt})"
                               if cfg.estimator != "gae" else ""))
    return cfg.model_copy(update={"rollout_batch": cfg.rollout_batch // n, "minibatch": cfg.minibatch // n})


def total_steps(cfg, train_prompts: int) -> int:
    prompts_per_step = cfg.rollout_batch // cfg.samples_per_prompt
    return cfg.max_steps or max(1, math.ceil(cfg.epochs * train_prompts / prompts_per_step))


def run(ctx: StageContext):
    """Train, evaluate and register one PPO entry; returns the registry `Entry`."""
    import copy

    from tqdm.auto import tqdm

    cfg = ctx.config
    process_cfg = per_process_config(cfg, ctx.name)
    tokenizer, (train, heldout, report), config_dump, _, (finished, resume_from) = start_run(
        ctx, lambda tokenizer: prepare_prompts(ctx, tokenizer))
    if finished is not None:  # re-running it would register a copy without training a step
        return finished
    rewards, recorded_sources = build_rewards(ctx)
    model, peft_cfg = build_policy(ctx, tokenizer)
    if torch.cuda.is_available() and cfg.method != "qlora":
        model.to(distributed.device())
    reference = copy.deepcopy(model).eval().requires_grad_(False) if peft_cfg is None else None
    value_head = build_value_head(model) if cfg.estimator == "gae" else None
    critic = "critic" if value_head is not None and cfg.value == "adapter" else None
    if critic:
        model.add_adapter(critic, peft_cfg)
        for name, param in model.named_parameters():
            if f".{critic}." in name:
                param.requires_grad_(True)
    steps = total_steps(cfg, len(train))
    updates = steps * cfg.ppo_epochs * math.ceil(cfg.rollout_batch / cfg.minibatch)
    trainer = PPOTrainer(process_cfg, model, tokenizer, rewards, value_head, reference, updates,
                         stage_precision(cfg).autocast, critic)
    trainable, total = check_trainable(ctx, model)
    log.info("%s: %d train / %d held-out prompts, %d steps of %d responses; %s trainable of %s parameters; "
             "estimator %s", ctx.entry_name, len(train), len(heldout), steps, cfg.rollout_batch,
             f"{trainable:,}", f"{total:,}", cfg.estimator)

    before, before_rewards, baseline = parent_heldout(ctx, trainer, heldout)
    start, history = (load_checkpoint(trainer, resume_from) if resume_from else (0, []))
    prompts_per_step = cfg.rollout_batch // cfg.samples_per_prompt
    started = time.perf_counter()
    ctx.budget.step_started()
    stopped_at_time_limit = False
    with StopRequest() as stop, tqdm(total=steps, initial=start, desc=f"ppo {ctx.entry_name}",
                                     disable=None) as bar:
        for step in range(start, steps):
            rows = distributed.shard(step_rows(train, step, prompts_per_step, cfg.samples_per_prompt, cfg.seed),
                                     cfg.samples_per_prompt)  # each process its own prompts
            figures = trainer.step(rows, [r["prompt_ids"] for r in rows], step)
            figures["step"] = step + 1
            history.append(figures)
            bar.update(1)
            bar.set_postfix(reward=f"{figures['reward']:.3f}", kl=f"{figures.get('kl_per_token', float('nan')):.3f}",
                            len=f"{figures['response_length']:.0f}")
            if (step + 1) % cfg.logging_steps == 0 or step == start:
                log.info("step %d: %s", step + 1, _log_line(figures))
            ctx.budget.step_done()
            # Decided together: a process that stopped alone would leave the others waiting for it.
            at_limit = bool(distributed.all_max(int(ctx.budget.over())))
            interrupted = bool(distributed.all_max(int(stop.requested)))
            if (step + 1) % cfg.save_steps == 0 or step + 1 == steps or at_limit or interrupted:
                save_checkpoint(ctx, trainer, step + 1, history)
            if interrupted:
                raise TrainingError(f"interrupted at step {step + 1}; a checkpoint is in {ctx.run_dir}. "
                                    "Run the same command again to resume.")
            if at_limit:
                stopped_at_time_limit = True
                log.warning("time limit of %.1f minutes for the whole stage: stopping training at step %d, keeping "
                            "%.0f s for the evaluation and the entry", cfg.time_limit_minutes, step + 1,
                            ctx.budget.still_to_come())
                break
    seconds = time.perf_counter() - started
    done = len(history)
    timings = {"train_seconds": round(seconds, 2), "steps": done, "steps_this_run": done - start,
               "steps_per_minute": round((done - start) / seconds * 60, 2) if seconds and done > start else None,
               "stopped_at_time_limit": stopped_at_time_limit, "budget": ctx.budget.describe(),
               "peak_rss_mb": round(peak_rss_mb(), 1),
               "resumed_from": str(resume_from) if resume_from else None, "mixed_precision": trainer.autocast or "no",
               **_time_split(history[start:])}

    after, after_rewards = distributed.on_main(lambda: heldout_figures(trainer, heldout))
    metrics = {f"heldout_{k}_before": v for k, v in before.items() if k != "prompts"}
    metrics.update({f"heldout_{k}": v for k, v in after.items()})
    if history:
        tail = history[-min(len(history), 5):]
        for key in ("reward", "kl_per_token", "entropy", "response_length", "eos_rate"):
            seen = [h[key] for h in tail if h.get(key) is not None]  # KL and entropy: steps that trained
            if seen:
                metrics[f"train_{key}_last"] = sum(seen) / len(seen)
    paired = paired_gain(before_rewards, after_rewards)
    metrics.update({f"heldout_reward_{k}": v for k, v in paired.items()})
    log.info("held-out reward %.4f -> %.4f (paired gain %s, higher on %s of prompts), per-token KL %.4f",
             before.get("reward", float("nan")), after.get("reward", float("nan")),
             f"{paired['gain']:+.4f} ± {paired['gain_stderr']:.4f}" if paired else "n/a",
             f"{paired['improved_share']:.0%}" if paired else "n/a", after.get("kl_per_token", float("nan")))
    model.eval()
    metrics.update(evaluate_model(ctx.recipe, model, tokenizer))
    title = f"{ctx.entry_name}: held-out rewards"
    extra_files = [lambda folder: rl_curves_png(history, folder / "rl_curves.png", ctx.entry_name),
                lambda folder: reward_histogram_png(before_rewards, after_rewards, folder / "reward_histogram.png",
                                                    title),
                lambda folder: write_json_atomic(folder / "heldout_rewards.json",
                                                 {"before": before_rewards, "after": after_rewards})]
    manifest_extra = {"baseline": baseline_record(ctx, baseline), "rl": {"estimator": cfg.estimator, "rewards": recorded_sources,
                             "kl": {**cfg.kl.model_dump(), "final_coef": trainer.kl.coef},
                             "value": cfg.value if cfg.estimator == "gae" else None}}
    if value_head is not None:
        manifest_extra["rl"]["value_head"] = "value_head.pt"
        extra_files.append(lambda folder: torch.save(value_head.state_dict(), folder / "value_head.pt"))
    if critic:  # the entry is the policy: PEFT saved the critic's adapter inside it; keep it beside instead
        extra_files.append(lambda folder: shutil.move(str(folder / "adapter" / critic), str(folder / critic)))
        manifest_extra["rl"]["critic_adapter"] = critic

    return register_entry(ctx, "policy", model, tokenizer, peft_cfg, report=report, config_dump=config_dump,
                          history=history, timings=timings, metrics=metrics,
                          adapter_extra={"targets": lora_targets(peft_cfg)}, manifest_extra=manifest_extra,
                          extra_files=extra_files)


def paired_gain(before: list[float], after: list[float]) -> dict:
    """How the same held-out prompts' rewards moved: mean per-prompt gain, its standard error, and the share
    of prompts scored higher after training. Paired, so prompt difficulty cancels; {} without pairs."""
    if not before or len(before) != len(after):
        return {}
    diffs = torch.tensor(after, dtype=torch.float64) - torch.tensor(before, dtype=torch.float64)
    stderr = float(diffs.std() / math.sqrt(len(diffs))) if len(diffs) > 1 else float("nan")
    return {"gain": float(diffs.mean()), "gain_stderr": stderr, "improved_share": float((diffs > 0).double().mean()),
            "worse_share": float((diffs < 0).double().mean())}


def _time_split(history: list[dict]) -> dict:
    if not history:
        return {}
    total = {k: sum(h.get(f"time_{k}", 0.0) for h in history) for k in ("generate", "score", "train")}
    whole = sum(total.values()) or 1.0
    tokens = sum(h.get("generated_tokens", 0.0) for h in history)
    return {"time_split": {k: round(v / whole, 3) for k, v in total.items()},
            "seconds_per_step": round(whole / len(history), 2),
            "generated_tokens_per_second": round(tokens / max(total["generate"], 1e-9), 1)}


def _log_line(figures: dict) -> str:
    keys = ["reward", "kl_per_token", "kl_coef", "entropy", "response_length", "eos_rate", "clip_fraction",
            "value_loss", "explained_variance", "time_generate", "time_score", "time_train"]
    keys += [k for k in figures if k.startswith("reward/")]
    return ", ".join(f"{k} {figures[k]:.4g}" for k in keys if isinstance(figures.get(k), (int, float)))
