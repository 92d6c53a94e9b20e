"""PPO's held-out measurement: the policy's greedy responses to held-out prompts scored and their exact KL to
the reference, before training (the parent, kept in the run folder for a resumed run) and after, paired by
prompt so the gain comes with its standard error."""

from __future__ import annotations

import json
import logging
import math
import time

import torch

from align.eval.hook import evaluate_model
from align.registry.records import write_json_atomic
from align.rl.ppo import PPOTrainer
from align.rl.rollout import sample_rollouts
from align.runtime import distributed
from align.stages.context import StageContext

log = logging.getLogger(__name__)


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


def paired_gain(before: list[float], after: list[float]) -> dict:
    """How the same held-out prompts' rewards moved: mean per-prompt gain, its standard error, and the share
    of prompts scored higher after training. Paired, so prompt difficulty cancels; {} without pairs."""
    if not before or len(before) != len(after):
        return {}
    diffs = torch.tensor(after, dtype=torch.float64) - torch.tensor(before, dtype=torch.float64)
    stderr = float(diffs.std() / math.sqrt(len(diffs))) if len(diffs) > 1 else float("nan")
    return {"gain": float(diffs.mean()), "gain_stderr": stderr, "improved_share": float((diffs > 0).double().mean()),
            "worse_share": float((diffs < 0).double().mean())}
