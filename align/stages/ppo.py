"""PPO stage: RL from a policy entry against reward models, verifiable checkers, or a weighted mix.

Why it is built this way:
- One base copy: the policy is the parent's weights plus a LoRA adapter (or QLoRA, or full weights); the
  reference is the same weights with the adapter disabled (full fine-tuning keeps a frozen copy); the
  critic, for `estimator: gae`, is a value head on the policy trunk. `grpo` and `rloo` need no critic.
- The loop (`align.rl.ppo`) is our own: TRL no longer ships PPO. Each step is sample -> score -> update,
  with the time split between them logged, so a slow stage says where its time goes.
- Rewards come from `align.rewards.mix` (`align.stages.ppo_rewards`): reward-model entries (refused at plan
  time, and again here, when they failed their quality gate, unless `allow_failed_gate`), named checkers with
  their arguments, user reward functions and generative judges (`align.rewards.judge`).
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

import logging
import math
import shutil
import time

import torch

from align.config.stages import PPOStage
from align.data.prepare import DataReport, heldout_split
from align.data.prompts import load_prompts
from align.data.tokenize import encode_prompt
from align.errors import TrainingError
from align.eval.hook import evaluate_model
from align.eval.plots import reward_histogram_png, rl_curves_png
from align.objectives.advantages import advantage_estimator
from align.registry.records import write_json_atomic
from align.rewards.checkers import fields_needed
from align.rl.ppo import PPOTrainer
from align.rl.settings import PPOSettings
from align.runtime import distributed
from align.runtime.precision import stage_precision
from align.stages import register_stage
from align.stages.base import EntryParts, Prepared, Stage, Trained
from align.stages.building import build_policy
from align.stages.callbacks import StopRequest
from align.stages.context import StageContext
from align.stages.hf_training import peak_rss_mb
from align.stages.ppo_checkpoint import load_checkpoint, save_checkpoint
from align.stages.ppo_heldout import heldout_figures, paired_gain, parent_heldout
from align.stages.ppo_rewards import build_rewards

log = logging.getLogger(__name__)


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
    grouped = advantage_estimator(cfg.estimator).needs_groups  # whole groups of samples stay on one process
    if cfg.minibatch % (n * cfg.samples_per_prompt if grouped else n):
        problems.append(f"minibatch {cfg.minibatch}")
    if problems:
        raise TrainingError(f"stages.{stage}: {' and '.join(problems)} must divide evenly among {n} processes"
                            + (f" (whole groups of samples_per_prompt {cfg.samples_per_prompt})"
                               if grouped else ""))
    return cfg.model_copy(update={"rollout_batch": cfg.rollout_batch // n, "minibatch": cfg.minibatch // n})


def total_steps(cfg, train_prompts: int) -> int:
    prompts_per_step = cfg.rollout_batch // cfg.samples_per_prompt
    return cfg.max_steps or max(1, math.ceil(cfg.epochs * train_prompts / prompts_per_step))


@register_stage
class PPO(Stage):
    """RL from a policy against reward models, checkers or a mix, through our own PPO loop (`align.rl.ppo`)."""

    kind = "ppo"
    config_type = PPOStage
    data_kind = "prompts"

    @classmethod
    def check_processes(cls, cfg, name: str, processes: int) -> None:
        per_process_config(cfg, name, processes)  # `rollout_batch` and `minibatch` are totals over the processes

    @classmethod
    def memory_sequence_length(cls, cfg, longest_row: int | None) -> int:
        return (longest_row if longest_row is not None else 256) + cfg.generation.max_new_tokens

    @classmethod
    def pass_token_budget(cls, cfg) -> int | None:
        return None  # its minibatches are its passes

    @classmethod
    def keeps_reference_copy(cls, cfg) -> bool:
        return cfg.method == "full"  # LoRA's reference is the same weights with the adapter off

    @classmethod
    def generated_at_once(cls, cfg) -> int:
        return cfg.rollout_batch

    def prepare(self, tokenizer) -> Prepared:
        train, heldout, report = prepare_prompts(self.ctx, tokenizer)
        return Prepared(train, heldout, report, unit="prompts")

    def build(self):
        self.rewards, self.recorded_sources = build_rewards(self.ctx)
        model, peft_cfg = build_policy(self.ctx, self.tokenizer)
        if torch.cuda.is_available() and self.cfg.method != "qlora":
            model.to(distributed.device())
        return model, peft_cfg

    def describe(self) -> str:
        return f"; estimator {self.cfg.estimator}"

    def make_trainer(self) -> PPOTrainer:
        """The PPO loop's trainer on the stage's policy, with its reference, value head or critic adapter."""
        import copy

        cfg, model, peft_cfg, tokenizer, rewards = self.cfg, self.model, self.peft_cfg, self.tokenizer, self.rewards
        process_cfg = per_process_config(cfg, self.ctx.name)
        reference = copy.deepcopy(model).eval().requires_grad_(False) if peft_cfg is None else None
        value_head = build_value_head(model) if advantage_estimator(cfg.estimator).needs_critic else None
        critic = "critic" if value_head is not None and cfg.value == "adapter" else None
        if critic:
            model.add_adapter(critic, peft_cfg)
            for name, param in model.named_parameters():
                if f".{critic}." in name:
                    param.requires_grad_(True)
        steps = total_steps(cfg, len(self.data.train))
        updates = steps * cfg.ppo_epochs * math.ceil(cfg.rollout_batch / cfg.minibatch)
        trainer = PPOTrainer(PPOSettings.from_stage(process_cfg), model, tokenizer, rewards, value_head, reference,
                             updates, stage_precision(cfg).autocast, critic)
        self.value_head, self.critic, self.steps = value_head, critic, steps
        return trainer

    def train(self) -> Trained:
        from tqdm.auto import tqdm

        ctx, cfg, train = self.ctx, self.cfg, self.data.train
        trainer = self.trainer = self.make_trainer()
        steps = self.steps
        self.before, self.before_rewards, self.baseline = parent_heldout(ctx, trainer, self.data.heldout)
        if self.resume_from is None:  # a resumed run's metrics.jsonl and events have them already
            self.tracker.log_evaluation(0, {**self.before, **(self.baseline or {})})
        start, history = (load_checkpoint(trainer, self.resume_from) if self.resume_from else (0, []))
        prompts_per_step = cfg.rollout_batch // cfg.samples_per_prompt
        started = time.perf_counter()
        ctx.budget.step_started()
        stopped_at_time_limit = False
        with StopRequest() as stop, tqdm(total=steps, initial=start, desc=f"ppo {ctx.entry_name}",
                                         disable=None) as bar:
            for step in range(start, steps):
                rows = distributed.shard(step_rows(train, step, prompts_per_step, cfg.samples_per_prompt,
                                                   cfg.seed), cfg.samples_per_prompt)  # each process its own prompts
                figures = trainer.step(rows, [r["prompt_ids"] for r in rows], step)
                figures["step"] = step + 1
                history.append(figures)
                self.tracker.log_step(step + 1, figures)  # metrics.jsonl, and TensorBoard when reported
                bar.update(1)
                bar.set_postfix(reward=f"{figures['reward']:.3f}",
                                kl=f"{figures.get('kl_per_token', float('nan')):.3f}",
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
                    log.warning("time limit of %.1f minutes for the whole stage: stopping training at step %d, "
                                "keeping %.0f s for the evaluation and the entry", cfg.time_limit_minutes,
                                step + 1, ctx.budget.still_to_come())
                    break
        seconds = time.perf_counter() - started
        done = len(history)
        timings = {"train_seconds": round(seconds, 2), "steps": done, "steps_this_run": done - start,
                   "steps_per_minute": round((done - start) / seconds * 60, 2) if seconds and done > start else None,
                   "stopped_at_time_limit": stopped_at_time_limit, "budget": ctx.budget.describe(),
                   "peak_rss_mb": round(peak_rss_mb(), 1),
                   "resumed_from": str(self.resume_from) if self.resume_from else None,
                   "mixed_precision": trainer.autocast or "no", **_time_split(history[start:])}
        return Trained(self.model, history, timings)

    def measure(self, trained: Trained) -> dict:
        trainer, history, before = self.trainer, trained.history, self.before
        after, self.after_rewards = distributed.on_main(lambda: heldout_figures(trainer, self.data.heldout))
        metrics = {f"heldout_{k}_before": v for k, v in before.items() if k != "prompts"}
        metrics.update({f"heldout_{k}": v for k, v in after.items()})
        if history:
            tail = history[-min(len(history), 5):]
            for key in ("reward", "kl_per_token", "entropy", "response_length", "eos_rate"):
                seen = [h[key] for h in tail if h.get(key) is not None]  # KL and entropy: steps that trained
                if seen:
                    metrics[f"train_{key}_last"] = sum(seen) / len(seen)
        paired = paired_gain(self.before_rewards, self.after_rewards)
        metrics.update({f"heldout_reward_{k}": v for k, v in paired.items()})
        log.info("held-out reward %.4f -> %.4f (paired gain %s, higher on %s of prompts), per-token KL %.4f",
                 before.get("reward", float("nan")), after.get("reward", float("nan")),
                 f"{paired['gain']:+.4f} ± {paired['gain_stderr']:.4f}" if paired else "n/a",
                 f"{paired['improved_share']:.0%}" if paired else "n/a", after.get("kl_per_token", float("nan")))
        trained.model.eval()
        metrics.update(evaluate_model(self.ctx.recipe, trained.model, self.tokenizer))
        return metrics

    def entry_parts(self, trained: Trained, metrics: dict) -> EntryParts:
        parts = super().entry_parts(trained, metrics)
        cfg, name, history = self.cfg, self.ctx.entry_name, trained.history
        before, after = self.before_rewards, self.after_rewards
        parts.files += [
            lambda folder: rl_curves_png(history, folder / "rl_curves.png", name),
            lambda folder: reward_histogram_png(before, after, folder / "reward_histogram.png",
                                                f"{name}: held-out rewards"),
            lambda folder: write_json_atomic(folder / "heldout_rewards.json", {"before": before, "after": after})]
        rl = {"estimator": cfg.estimator, "rewards": self.recorded_sources,
              "kl": {**cfg.kl.model_dump(), "final_coef": self.trainer.kl.coef},
              "value": cfg.value if advantage_estimator(cfg.estimator).needs_critic else None}
        if self.value_head is not None:
            rl["value_head"] = "value_head.pt"
            parts.files.append(lambda folder: torch.save(self.value_head.state_dict(), folder / "value_head.pt"))
        if self.critic:  # the entry is the policy: PEFT saved the critic's adapter inside it; keep it beside instead
            critic = self.critic
            parts.files.append(lambda folder: shutil.move(str(folder / "adapter" / critic), str(folder / critic)))
            rl["critic_adapter"] = critic
        parts.manifest.update({**self.baseline_manifest(self.baseline), "rl": rl})
        return parts


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
            "value_loss", "explained_variance", "logprob_mismatch_max", "time_generate", "time_score", "time_train"]
    keys += [k for k in figures if k.startswith("reward/")]
    return ", ".join(f"{k} {figures[k]:.4g}" for k in keys if isinstance(figures.get(k), (int, float)))
