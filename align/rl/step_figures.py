"""The figures one PPO step logs: reward (per source), KL and entropy at sampling time, lengths, EOS share,
the critic's explained variance and the time split, pooled over every process."""

from __future__ import annotations

import torch

from align.objectives.kl import FIGURE_ESTIMATOR, kl_per_token
from align.objectives.stats import explained_variance, masked_mean
from align.rl.experience import Experience
from align.runtime import distributed


class StepFigures:
    """Methods of `PPOTrainer` (see the module docstring); they use its attributes."""

    def sampling_figures(self, exp: Experience) -> dict:
        """Per-token KL to the reference and entropy at sampling time, over every process's trained rows
        ({} when there were none)."""
        if exp.old_logps is None:  # nothing trained here (all groups uniform); other processes may have rows
            kl = entropy = mask = torch.zeros(0, 1)
        else:
            kl, entropy, mask = kl_per_token(exp.old_logps, exp.ref_logps, FIGURE_ESTIMATOR), exp.entropy, exp.mask
        if not distributed.is_distributed():
            if exp.old_logps is None:
                return {}
            return {"kl_per_token": float(masked_mean(kl, mask)), "entropy": float(masked_mean(entropy, mask))}
        totals = distributed.all_sum(torch.stack([(kl * mask).sum(), (entropy * mask).sum(), mask.sum()]).double())
        if float(totals[2]) == 0.0:
            return {}
        return {"kl_per_token": float(totals[0] / totals[2]), "entropy": float(totals[1] / totals[2])}

    def figures(self, exp: Experience, stats: dict, timings: dict, observed_kl: float | None, coef: float) -> dict:
        """The step's figures over every process's rollouts (`distributed.gather_cat` is the identity alone)."""
        gather = distributed.gather_cat
        sampled, scores = exp.sampled, gather(exp.sampled_scores)
        lengths = gather(sampled.response_lengths.float())
        out = {"reward": float(scores.mean()), "reward_std": float(scores.std()) if len(scores) > 1 else 0.0}
        out.update({f"reward/{name}": float(gather(values).mean()) for name, values in exp.per_source.items()})
        trained_lengths = gather(exp.mask.sum(dim=1))
        out.update({"kl_coef": coef, "response_length": float(lengths.mean()),
                    "eos_rate": float(gather(sampled.ended.float()).mean()), "lr": self.scheduler.get_last_lr()[0],
                    "trained_share": len(trained_lengths) / max(len(lengths), 1), **stats})
        if observed_kl is not None:  # measured on the trained rows
            out["kl_per_sequence"] = observed_kl * float(trained_lengths.mean())
        if exp.values is not None:
            reduce = distributed.reducer()
            out["explained_variance"] = explained_variance(exp.values, exp.returns, exp.mask, reduce=reduce)
            out["value_mean"] = float(masked_mean(exp.values, exp.mask, reduce=reduce))
        tokens = float(lengths.sum())
        out.update({f"time_{k}": round(v, 3) for k, v in timings.items()})
        out["step_seconds"] = round(sum(timings.values()), 3)
        out["generated_tokens"] = tokens
        return out
