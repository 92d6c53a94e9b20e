"""Training objectives as pure tensor functions, each golden-tested; variants in named registries.

- `preference`: the DPO family (`PREFERENCE_LOSSES`), with what each loss needs (a reference or not,
  summed or per-token log-probs, which settings);
- `reward`: the reward model's pairwise ranking losses (`RANKING_LOSSES`) and pairwise accuracy;
- `advantages`: PPO-family advantage estimators (`ADVANTAGE_ESTIMATORS`), with whether each needs a critic
  or groups of samples per prompt;
- `kl`: KL estimators (`KL_ESTIMATORS`), coefficient controllers (`KL_CONTROLLERS`) and the penalty;
- `ppo_losses`: the clipped policy and value losses;
- `stats`: masked statistics, on one process's rows or pooled over every process's;
- `registry`: the registry type, and the recipe check that a name is registered.
"""
