"""Training objectives as pure tensor functions, each golden-tested; variants in named registries.

- `preference`: the DPO family (`PREFERENCE_LOSSES`), with what each loss needs (a reference or not,
  summed or per-token log-probs, which settings);
- `ranking`: the reward model's pairwise ranking losses (`RANKING_LOSSES`) and pairwise accuracy;
- `advantages`: PPO-family advantage estimators (`ADVANTAGE_ESTIMATORS`), with whether each needs a critic
  or groups of samples per prompt;
- `kl`: KL estimators (`KL_ESTIMATORS`), coefficient controllers (`KL_CONTROLLERS`) and the penalty;
- `policy_losses`: the PPO family's policy losses (`POLICY_LOSSES`: ppo, gspo, cispo) and how their per-token
  losses aggregate (`LOSS_AGGREGATIONS`);
- `ppo_losses`: the policy loss by name, and the clipped value loss;
- `stats`: masked statistics, on one process's rows or pooled over every process's;
- `registry`: the registry type, and the recipe check that a name is registered.
"""
