"""PPO, both sides, one step at a time split into generation, scoring and training: the stage's own loop
(`align.rl.ppo.PPOTrainer` built as `align.stages.ppo` builds it, GRPO advantages, math checker, our sampler)
against TRL's `GRPOTrainer` (its defaults: `generate` through PEFT's wrappers, beta 0) on the same prompts in
the same steps, k samples each, the same checker as its reward function and a PEFT LoRA of the same shape."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from benchmarks.bench.common import lora_config, stage_context, trl_common_args
from benchmarks.bench.measure import peak_memory
from benchmarks.bench.workload import StageWork, Workload

# Per-step figures of the align side kept in its result (benchmarks/gpu_check.py checks them).
STEP_FIGURES = ("policy_loss", "kl_per_token", "grad_norm", "eos_rate", "response_length", "reward")


def _rows(ctx):
    from align.stages.ppo import PPO, step_rows

    cfg = ctx.config
    stage = PPO(ctx)
    stage.start()
    tokenizer, train = stage.tokenizer, stage.data.train
    k = cfg.samples_per_prompt
    steps = [step_rows(train, s, cfg.rollout_batch // k, k, cfg.seed) for s in range(cfg.max_steps)]
    return tokenizer, steps


def _summary(gen: list[float], score: list[float], train: list[float], tokens: list[float], responses: int) -> dict:
    n = len(gen)  # every step counts (the same prompts in the same steps on both sides)
    g, s, t = (sum(x) / n for x in (gen, score, train))
    return {"steps": n, "seconds_per_step": round(g + s + t, 3),
            "generation_seconds": round(g, 3), "scoring_seconds": round(s, 3), "training_seconds": round(t, 3),
            "rollout_tokens_per_second": round(sum(tokens) / sum(gen), 1) if sum(gen) else None,
            "responses_per_step": responses, "tokens_per_second": None,
            "mean_response_tokens": round(sum(tokens) / len(tokens) / responses, 1)}


def run(side: str, work: Workload, stage: StageWork, folder: Path) -> dict:
    import torch

    ctx = stage_context(work, stage, folder)
    torch.manual_seed(work.seed)
    tokenizer, step_prompts = _rows(ctx)
    cfg = ctx.config
    steps_seen: list[dict] = []  # the align side's per-step figures (STEP_FIGURES)
    if side == "align":
        from align.rl.ppo import PPOTrainer
        from align.rl.settings import PPOSettings
        from align.runtime.precision import stage_precision
        from align.stages.building import build_policy
        from align.stages.ppo import build_rewards

        rewards, _ = build_rewards(ctx)
        model, _ = build_policy(ctx, tokenizer)
        if torch.cuda.is_available() and cfg.method != "qlora":  # as the stage does: PPO has no Trainer to move it
            from align.runtime import distributed

            model.to(distributed.device())
        updates = cfg.max_steps * cfg.ppo_epochs * math.ceil(cfg.rollout_batch / cfg.minibatch)
        trainer = PPOTrainer(PPOSettings.from_stage(cfg), model, tokenizer, rewards, None, None, updates,
                             stage_precision(cfg).autocast, None)
        gen, score, train, tokens, rewards_seen = [], [], [], [], []
        for step, rows in enumerate(step_prompts):
            figures = trainer.step(rows, [r["prompt_ids"] for r in rows], step)
            gen.append(figures["time_generate"])
            score.append(figures["time_score"])
            train.append(figures["time_train"])
            tokens.append(figures["generated_tokens"])
            rewards_seen.append(figures["reward"])
            steps_seen.append({key: figures.get(key) for key in STEP_FIGURES})
    else:
        gen, score, train, tokens, rewards_seen = _trl(ctx, work, stage, folder, tokenizer, step_prompts)
    out = _summary(gen, score, train, tokens, cfg.rollout_batch)
    out.update(peak_memory())
    out["mean_reward"] = round(sum(rewards_seen) / len(rewards_seen), 4)
    out["loss_mean"] = None
    if steps_seen:
        out["step_figures"] = steps_seen
        out["step_losses"] = [f["policy_loss"] for f in steps_seen]
    return out


def _trl(ctx, work, stage, folder, tokenizer, step_prompts):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from benchmarks.bench.measure import StepClock, trainer_clock
    from align.models.loading import load_causal_lm
    from align.rewards.checkers import get_checker

    cfg = ctx.config
    k = cfg.samples_per_prompt
    ordered = [rows[i] for rows in step_prompts for i in range(0, len(rows), k)]  # our steps' prompts, in order
    data = Dataset.from_dict({"prompt": [r["messages"] for r in ordered],
                              "row": [json.dumps({key: v for key, v in r.items() if key != "prompt_ids"})
                                      for r in ordered]})
    check = get_checker("math_answer")
    rewards_seen = []

    def math_reward(completions, row, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        scores = [check(text, json.loads(r)) for text, r in zip(texts, row)]
        rewards_seen.append(sum(scores) / len(scores))
        return scores

    timers = {"generation": [], "scoring": []}

    class TimedGRPO(GRPOTrainer):
        """Generation (`_generate`) and the whole generate-and-score call timed; scoring is the difference."""

        def _generate(self, *args, **kwargs):
            started = time.perf_counter()
            try:
                return super()._generate(*args, **kwargs)
            finally:
                timers["generation"].append(time.perf_counter() - started)

        def _generate_and_score_completions(self, *args, **kwargs):
            started = time.perf_counter()
            out = super()._generate_and_score_completions(*args, **kwargs)
            timers["scoring"].append(time.perf_counter() - started - timers["generation"][-1])
            timers.setdefault("tokens", []).append(float(out["completion_mask"].sum()))
            return out

    common = trl_common_args(stage, work, folder)
    common["per_device_train_batch_size"] = cfg.rollout_batch
    common["include_num_input_tokens_seen"] = "no"
    args = GRPOConfig(**common, num_generations=k, max_completion_length=cfg.generation.max_new_tokens,
                      temperature=cfg.generation.temperature, shuffle_dataset=False)
    model = load_causal_lm(ctx.parent, ctx.registry, dtype="auto")
    clock = StepClock()
    trainer = TimedGRPO(model=model, reward_funcs=[math_reward], args=args, train_dataset=data,
                        processing_class=tokenizer, peft_config=lora_config(work), callbacks=[trainer_clock(clock)])
    trainer.train()
    steps = clock.seconds
    train = [total - g - s for total, g, s in zip(steps, timers["generation"], timers["scoring"])]
    return timers["generation"], timers["scoring"], train, timers["tokens"], rewards_seen
