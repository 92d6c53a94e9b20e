"""One PPO-family step, our own: rollouts -> rewards -> log-probs and values -> advantages -> clipped updates.

Why our own: TRL no longer ships PPO, and the frameworks that do pin old library versions or break with
LoRA. This is written on torch, transformers and PEFT only, around one base copy of the weights:

- the policy is the base plus a trainable LoRA adapter (or full weights);
- the reference is the same weights with the adapter switched off (`disable_adapter`), so it costs no
  memory; full fine-tuning keeps a frozen copy instead;
- the critic (estimator `gae`) is a value head on the policy's trunk (`value: head`: one forward pass
  serves both), or on a second LoRA adapter of the same base (`value: adapter`: the critic's gradients
  never touch the policy's weights, at the price of a second pass); `grpo` and `rloo` need no critic:
  they compare the k responses sampled for each prompt (group-normalized or leave-one-out baselines).

The KL penalty against the reference goes into the reward, per token (the classic InstructGPT form, with
a fixed or adaptive coefficient), or into the loss (`kl.penalty: loss`, GRPO's form), each computed by its
estimator (`align.objectives.kl`). The advantage estimator is looked up in `align.objectives.advantages`,
whose properties (needs a critic, needs groups of samples) decide which passes run; losses and statistics
are the pure functions of `align.objectives`, checked against hand-computed values in the tests. The
trainer reads only `PPOSettings` (`align.rl.settings`). Every step returns its figures: reward per source,
KL, entropy, clip fraction, value loss, explained variance, response length, EOS share, the time split, and
how far the sampler's log-probs are from the policy's (`align.rl.logprob_mismatch`, which can stop the run).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time

import torch

from align.errors import TrainingError
from align.models.logprobs import can_split, causal_parts, distribution_kl, labelled_hidden, logit_softcap, token_logps
from align.objectives.advantages import AdvantageBatch
from align.objectives.kl import FIGURE_ESTIMATOR, kl_per_token
from align.objectives.ppo_losses import ppo_policy_loss, ppo_value_loss
from align.objectives.stats import masked_mean, whiten
from align.rl.experience import Experience, informative_rows
from align.rl.logprob_mismatch import mismatch_figures, stop_if_mismatched, warn_if_unmeasured
from align.rl.pass_checks import SharedPassChecks
from align.rl.reward_shaping import shaped_scores
from align.rl.rollout import Rollouts, sample_rollouts, trimmed
from align.rl.settings import PPOSettings
from align.rl.step_figures import StepFigures
from align.runtime import distributed

log = logging.getLogger(__name__)


class PPOTrainer(SharedPassChecks, StepFigures):
    """Holds the policy, critic, optimizer, KL controller and reward mix; `step` does one PPO iteration."""

    def __init__(self, settings: PPOSettings, model, tokenizer, rewards, value_head=None, reference=None,
                 total_updates: int = 1, autocast: str | None = None, critic_adapter: str | None = None):
        from transformers import get_scheduler

        self.settings, self.model, self.tokenizer, self.rewards = settings, model, tokenizer, rewards
        estimator = settings.estimator
        self.value_head, self.reference = value_head, reference
        # Training passes' autocast dtype (`align.runtime.precision`); fp16 brings a gradient scaler (its small
        # gradients underflow otherwise), bf16 and fp32 need none.
        self.autocast = autocast
        self.critic_adapter = critic_adapter  # the name of the critic's LoRA adapter, or None (head on policy)
        self.device = next(model.parameters()).device
        self.scaler = torch.amp.GradScaler(self.device.type) if autocast == "fp16" else None
        self.kl = settings.kl.new_controller()
        params = [p for p in model.parameters() if p.requires_grad]
        if value_head is not None:
            params += list(value_head.parameters())
        # Several processes (each with its own prompts) keep one set of weights: the same start, then gradients
        # summed over processes before every optimizer step (`update`).
        distributed.broadcast_parameters(params)
        self.optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
        self.scheduler = get_scheduler(settings.scheduler, self.optimizer,
                                       num_warmup_steps=int(settings.warmup_ratio * total_updates),
                                       num_training_steps=total_updates)
        self.temperature = settings.generation.temperature or 1.0
        # The frozen bottom blocks are shared by policy and reference (adapter disabled): run them once per
        # rollout. Checked against the plain path on the first batch.
        frozen = settings.freeze_layers
        self.split = frozen if (reference is None and frozen and can_split(model)) else 0
        self._split_checked = False
        # Without a critic, the k responses sampled per prompt share its pass: the scoring and training passes
        # run each prompt once and share its KV cache among the k rows (`align.models.logprobs.grouped_hidden`).
        # That saves more than the shared frozen prefix does (which it replaces), and is checked on the first
        # batch too.
        k = settings.samples_per_prompt
        self.group = k if (not estimator.needs_critic and k > 1 and settings.batch_size % k == 0
                           and settings.minibatch % k == 0) else 1
        if self.group > 1:
            self.split = 0
        self._group_checked = False
        # One update per rollout with the KL in the loss and no critic: the policy's log-probs at sampling time
        # equal those of the update's own forward pass, so no separate pass is needed (ratio 1, as in GRPO).
        self.on_policy = (settings.ppo_epochs == 1 and settings.minibatch >= settings.rollout_batch
                          and not estimator.needs_critic and settings.kl.in_loss)
        # Rollouts decode from a plain copy with the adapter folded in (`align.rl.sampling_copy`): exact, and
        # without PEFT's per-token LoRA overhead; in bf16 where sampling runs in bf16 anyway. None for full
        # fine-tuning and QLoRA.
        self.sampling = None
        if reference is None and settings.method == "lora":
            from align.rl.sampling_copy import build
            from align.runtime.precision import inference_dtype, torch_dtype

            half = inference_dtype(model)
            self.sampling = build(model, dtype=torch_dtype(half) if half else None)
        self.skip_uniform = settings.skip_uniform_groups and estimator.needs_groups and settings.kl.in_loss
        warn_if_unmeasured(settings.generation, settings.max_logprob_mismatch)

    @property
    def cfg(self) -> PPOSettings:
        """The settings, by the name `align.stages.ppo` reads them."""
        return self.settings

    # -------------------------------------------------------------------------------------- passes

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        from align.runtime.precision import torch_dtype

        return torch.autocast(self.device.type, dtype=torch_dtype(self.autocast))

    @contextlib.contextmanager
    def reference_model(self):
        if self.reference is not None:
            yield self.reference
        else:
            with self.model.disable_adapter():
                yield self.model

    @contextlib.contextmanager
    def _critic(self):
        """Route forward passes through the critic's adapter. PEFT's `set_adapter` also flips which adapter
        is trainable; both must stay trainable (one optimizer), so the flags are put back afterwards."""
        flags = {name: p.requires_grad for name, p in self.model.named_parameters()}
        self.model.set_adapter(self.critic_adapter)
        try:
            yield
        finally:
            self.model.set_adapter("default")
            for name, p in self.model.named_parameters():
                p.requires_grad_(flags[name])

    def _values(self, rollouts: Rollouts, index, prefixes) -> tuple[dict, int]:
        """Values from the critic: the policy's own pass (`value: head`) is not used here; this is the
        separate critic adapter's pass (`value: adapter`)."""
        with self._critic():
            return self._forward(self.model, rollouts, index, self.value_head, prefixes, values_only=True)

    def _forward(self, model, rollouts: Rollouts, index, value_head=None,
                 prefixes: list[torch.Tensor] | None = None, values_only: bool = False,
                 group: int | None = None) -> tuple[dict, int]:
        ids, mask, labels, width = trimmed(rollouts, index)
        group = self.group if group is None else group
        prefix = None
        if prefixes is not None:
            prefix = torch.zeros(len(index), width, prefixes[0].size(-1), dtype=prefixes[0].dtype)
            for row, i in enumerate(index):
                prefix[row, : prefixes[i].size(0)] = prefixes[i]
            prefix = prefix.to(self.device)
        with self._autocast():
            out = token_logps(model, ids.to(self.device), mask.to(self.device), labels.to(self.device),
                              self.temperature, value_head, prefix=prefix, start=self.split, values_only=values_only,
                              group=group if prefix is None else 1)
        return out, width - 1

    @torch.no_grad()
    def scoring_pass(self, model, rollouts: Rollouts, value_head=None,
                      prefixes: list[torch.Tensor] | None = None, grouped: bool = True) -> dict[str, torch.Tensor]:
        """Log-probs (and entropy, values) for every rollout row in chunks of `batch_size`, as [B, T].
        `grouped`: the rows are the step's rollouts (k per prompt); False for other rows (held-out prompts)."""
        rows, width = len(rollouts), rollouts.input_ids.size(1) - 1
        group = None if grouped else 1
        out: dict[str, torch.Tensor] = {}
        for start in range(0, rows, self.settings.batch_size):
            index = list(range(start, min(start + self.settings.batch_size, rows)))
            if value_head is not None and self.critic_adapter:
                part, w = self._forward(model, rollouts, index, None, prefixes, group=group)
                part["values"] = self._values(rollouts, index, prefixes)[0]["values"]
            else:
                part, w = self._forward(model, rollouts, index, value_head, prefixes, group=group)
            for key, value in part.items():
                out.setdefault(key, torch.zeros(rows, width))[index, :w] = value.float().cpu()
        return out

    @torch.no_grad()
    def exact_kl(self, model, rollouts: Rollouts) -> float:
        """Mean KL(model || reference) per response token of `rollouts`, exact over the vocabulary at each
        position (`distribution_kl`, at the sampling temperature): never negative, unlike the k1 estimate of
        the sampled tokens, which on a few held-out responses often is. For held-out figures; the training
        step keeps k1/k3 of the sampled tokens (what the penalty and adaptive controller are defined on)."""
        total, count = 0.0, 0
        for start in range(0, len(rollouts), self.settings.batch_size):
            index = list(range(start, min(start + self.settings.batch_size, len(rollouts))))
            ids, mask, labels, _ = trimmed(rollouts, index)
            ids, mask, labels = ids.to(self.device), mask.to(self.device), labels.to(self.device)
            with self._autocast():
                hidden = labelled_hidden(model, ids, mask, labels)
            weight = causal_parts(model)[1].weight
            with self.reference_model() as reference, self._autocast():
                ref_hidden = labelled_hidden(reference, ids, mask, labels)
                kl = distribution_kl(hidden, weight, ref_hidden, causal_parts(reference)[1].weight, self.temperature,
                                     logit_softcap(model))
            total, count = total + float(kl.sum()), count + kl.numel()
        return total / count if count else 0.0

    # -------------------------------------------------------------------------------------- experience

    def make_experience(self, rows: list[dict], prompt_ids: list[list[int]]) -> tuple[Experience, dict]:
        settings = self.settings
        self.model.eval()  # no dropout anywhere: the ratio must be 1 before the first update
        started = time.perf_counter()
        sampler = self.sampling.sync() if self.sampling is not None else self.model
        rollouts = sample_rollouts(sampler, self.tokenizer, rows, prompt_ids, settings.generation,
                                   settings.rollout_batch, settings.samples_per_prompt)
        generated = time.perf_counter()
        scores, per_source = self.rewards(rows, rollouts.texts)
        scores = shaped_scores(scores, rollouts, settings)  # missing-EOS and overlong penalties
        sampled, sampled_scores = rollouts, scores
        if self.skip_uniform:
            keep = informative_rows(scores, settings.samples_per_prompt)
            rollouts, scores = rollouts.select(keep), scores[keep]
            if not keep:  # every prompt's responses scored alike: nothing to learn from this batch
                empty = torch.zeros(0, rollouts.input_ids.size(1) - 1)
                experience = Experience(rollouts=rollouts, mask=empty, old_logps=None, ref_logps=empty, entropy=None,
                                        values=None, scores=scores, per_source=per_source, advantages=empty,
                                        returns=None, sampled=sampled, sampled_scores=sampled_scores)
                return experience, {"generate": generated - started, "score": time.perf_counter() - generated}
        if self.group > 1 and not self._group_checked and len(rollouts):
            self._check_grouping(rollouts)
        prefixes = self._prefixes(rollouts)
        policy = {} if self.on_policy else self.scoring_pass(self.model, rollouts, self.value_head, prefixes)
        with self.reference_model() as reference:
            ref_logps = self.scoring_pass(reference, rollouts, prefixes=prefixes)["logps"]
        mask = rollouts.mask.float()
        old_logps, values = policy.get("logps"), policy.get("values")
        advantages, returns = self.advantages(scores, old_logps, ref_logps, values, mask)
        scored = time.perf_counter()
        experience = Experience(rollouts=rollouts, mask=mask, old_logps=old_logps, ref_logps=ref_logps,
                                entropy=policy.get("entropy"), values=values, scores=scores,
                                per_source=per_source, advantages=advantages, returns=returns, prefixes=prefixes,
                                sampled=sampled, sampled_scores=sampled_scores)
        return experience, {"generate": generated - started, "score": scored - generated}

    def advantages(self, scores, old_logps, ref_logps, values, mask) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The configured estimator's advantages (and the critic's returns, or None) for one step's rows; the
        reward carries coef * KL only when the penalty goes there."""
        penalty = self.settings.kl
        if penalty.in_reward and old_logps is not None:
            kl, coef = kl_per_token(old_logps, ref_logps, penalty.estimator) * mask, self.kl.coef
        else:
            kl, coef = torch.zeros_like(mask), 0.0
        batch = AdvantageBatch(scores=scores, kl=kl, kl_coef=coef, mask=mask, values=values)
        advantages, returns = self.settings.estimator(batch, self.settings.advantage)
        if self.settings.advantage.whiten:  # mean and variance over every process's rows
            advantages = whiten(advantages, mask, reduce=distributed.reducer())
        return advantages, returns

    # -------------------------------------------------------------------------------------- update

    def update(self, exp: Experience, step: int) -> dict:
        """`ppo_epochs` passes over the rollouts in minibatches of `minibatch` rows (accumulated in micro-batches
        of `batch_size`); the policy loss aggregated over a minibatch by `loss_aggregation`, the rest token means."""
        settings = self.settings
        rows = len(exp.rollouts)
        generator = torch.Generator().manual_seed(settings.seed * 100_003 + step)
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}

        def add(name: str, value, weight: float) -> None:
            sums[name] = sums.get(name, 0.0) + float(value) * weight
            weights[name] = weights.get(name, 0.0) + weight

        self.model.eval()
        trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
        # Under several processes `settings.minibatch` is this process's share of a minibatch; every process takes
        # as many optimizer steps (a process short of rows adds zero gradients), and a minibatch's loss is the
        # token mean over all processes' rows (gradients summed, each scaled by the global token count).
        minibatches = distributed.all_max(math.ceil(rows / settings.minibatch))
        aggregation = settings.loss_aggregation
        for _ in range(settings.ppo_epochs):
            if self.group > 1:  # minibatches and micro-batches hold whole groups (their prompt runs once)
                groups = torch.randperm(rows // self.group, generator=generator).tolist()
                order = [g * self.group + j for g in groups for j in range(self.group)]
            else:
                order = torch.randperm(rows, generator=generator).tolist()
            for start in range(0, minibatches * settings.minibatch, settings.minibatch):
                minibatch = order[start:start + settings.minibatch]
                minibatch_tokens = float(distributed.all_sum(exp.mask[minibatch].sum()).clamp(min=1.0))
                # the policy loss's micro-batches weigh by their tokens or (a per-row aggregation) their rows
                minibatch_weight = (float(distributed.all_sum(torch.tensor(float(len(minibatch)))).clamp(min=1.0))
                                    if aggregation.per_row else minibatch_tokens)
                self.optimizer.zero_grad(set_to_none=True)
                for micro_start in range(0, len(minibatch), settings.batch_size):
                    micro = minibatch[micro_start:micro_start + settings.batch_size]
                    head = None if self.critic_adapter else self.value_head
                    out, t = self._forward(self.model, exp.rollouts, micro, head, exp.prefixes)
                    if self.critic_adapter:
                        out["values"] = self._values(exp.rollouts, micro, exp.prefixes)[0]["values"]
                    mask = exp.mask[micro, :t].to(self.device)
                    share = float(mask.sum()) / minibatch_tokens
                    policy_share = float(aggregation.weight(mask)) / minibatch_weight
                    old = (out["logps"].detach() if exp.old_logps is None
                           else exp.old_logps[micro, :t].to(self.device))
                    ref = exp.ref_logps[micro, :t].to(self.device)
                    policy_loss, clip_fraction, approx_kl = ppo_policy_loss(
                        out["logps"], old, exp.advantages[micro, :t].to(self.device), mask, settings.policy)
                    if exp.old_logps is None:  # on-policy: the sampling-time figures come from this pass
                        exp.record_update_logps(micro, t, old)
                        add("kl_per_token", masked_mean(kl_per_token(old, ref, FIGURE_ESTIMATOR), mask), share)
                        add("entropy", masked_mean(out["entropy"], mask), share)
                    loss = policy_loss if policy_share == share else policy_loss * (policy_share / max(share, 1e-12))
                    add("policy_loss", policy_loss.detach(), policy_share)
                    add("clip_fraction", clip_fraction, share)
                    add("approx_kl", approx_kl, share)
                    if self.value_head is not None:
                        value_loss, value_clipped = ppo_value_loss(
                            out["values"], exp.values[micro, :t].to(self.device),
                            exp.returns[micro, :t].to(self.device), mask, settings.value_clip)
                        loss = loss + settings.vf_coef * value_loss
                        add("value_loss", value_loss.detach(), share)
                        add("value_clip_fraction", value_clipped, share)
                    if settings.kl.in_loss:
                        kl_loss = masked_mean(kl_per_token(out["logps"], ref, settings.kl.estimator), mask)
                        loss = loss + self.kl.coef * kl_loss
                    scaled = loss * share
                    (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                    if not math.isfinite(float(loss.detach())):
                        # `step` counts from 0 here; the history and checkpoints count from 1.
                        raise TrainingError(f"PPO loss became {float(loss.detach())} at step {step + 1}; stopping "
                                            "before the optimizer step, no checkpoint written after it. Lower the "
                                            "learning rate or check the rewards.")
                distributed.sum_gradients(trainable)
                if self.scaler:
                    self.scaler.unscale_(self.optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
                add("grad_norm", grad_norm, 1.0)
                if self.scaler:  # skips the step where the scaled gradients overflowed, then adjusts the scale
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                self.scheduler.step()
        if distributed.is_distributed():
            return distributed.combine_weighted(sums, weights)
        return {name: sums[name] / max(weights[name], 1e-12) for name in sums}

    # -------------------------------------------------------------------------------------- one step

    def step(self, rows: list[dict], prompt_ids: list[list[int]], step: int) -> dict:
        """Sample, score and update once; returns the step's figures (flat, JSON-ready)."""
        # The same samples when a step is redone on resume; each process its own stream.
        seed = self.settings.seed * 1_000_003 + step + 7_919 * distributed.rank()
        torch.manual_seed(seed)
        random.seed(seed)
        exp, timings = self.make_experience(rows, prompt_ids)
        started = time.perf_counter()
        stats = self.update(exp, step)
        timings["train"] = time.perf_counter() - started
        if not self.on_policy:  # else the update's own pass measured them
            stats.update(self.sampling_figures(exp))
        stats.update(mismatch_figures(exp))
        stop_if_mismatched(stats, self.settings.max_logprob_mismatch, step)
        observed_kl = stats.get("kl_per_token")  # None when no row was trained on (all groups uniform)
        coef = self.kl.coef
        if observed_kl is not None:  # the global KL and row count: the coefficient stays the same everywhere
            self.kl.update(observed_kl, int(distributed.all_sum(torch.tensor(len(exp.rollouts)))))
        return self.figures(exp, stats, timings, observed_kl, coef)

    # -------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict:
        trainable = {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        return {"trainable": trainable,
                "value_head": self.value_head.state_dict() if self.value_head is not None else None,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "kl": self.kl.state_dict(), "rewards": self.rewards.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None}

    def load_state_dict(self, state: dict) -> None:
        params = dict(self.model.named_parameters())
        missing = sorted(set(state["trainable"]) - set(params))
        if missing:
            raise TrainingError(f"checkpoint holds parameters this model lacks, e.g. {missing[0]}; "
                                "it was written by a different setup")
        with torch.no_grad():
            for name, value in state["trainable"].items():
                params[name].copy_(value.to(params[name].device))
        if self.value_head is not None and state.get("value_head") is not None:
            self.value_head.load_state_dict(state["value_head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl.load_state_dict(state["kl"])
        self.rewards.load_state_dict(state["rewards"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
