"""KTO's `Trainer`: rows labelled desirable or undesirable, each with its mismatched combination for z0.

Why it is built this way:
- A batch is B rows (prompt + completion, with the label), and, with `kl_estimate: mismatched`, each row's
  fixed mismatched combination (`align.data.prepare_unpaired`), with the reference log-probs of both when
  they were precomputed.
- Each micro-batch first gets its reference point z0 (`align.objectives.unpaired.reference_point`): one
  pass without gradients over its mismatched combinations (the policy's; the reference's too unless
  precomputed), pooled over processes, clamped at 0. KTO's z0 carries no gradient, so that pass keeps no
  activations. Then the rows train, in one pass or, over `max_pass_tokens`, in several passes of whole rows
  each weighted by its share of the rows, all with the same z0: the gradient is the whole batch's however it
  is split. With `grad_accum` > 1, z0 is each micro-batch's (as in TRL).
- Log-probs come from `align.models.logprobs.sequence_logps` (the LM head at response tokens only, in fp32),
  batches are length-grouped in an order fixed by seed and epoch, as for DPO (`PairBatchesMixin`).
"""

from __future__ import annotations

import math

import torch

from align.data.sampling import pad_right
from align.data.tokenize import IGNORE
from align.models.logprobs import frozen_prefix_states, sequence_logps
from align.objectives.unpaired import FeedbackLogps, label_accuracy, reference_point, unpaired_loss
from align.runtime import distributed
from align.stages.callbacks import check_finite
from align.stages.hf_training import PairBatchesMixin

KL_KEYS = ("kl_input_ids", "kl_attention_mask", "kl_labels", "kl_reference")


class FeedbackCollator:
    """Rows -> one right-padded batch with labels on the completions, each row's label and reference
    log-prob, and, when the rows have them, their mismatched combinations (`kl_*`)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        ids, mask = pad_right([r["ids"] for r in rows], self.pad_id)
        labels, _ = pad_right([r["labels"] for r in rows], IGNORE)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels,
                 "desirable": torch.tensor([r["desirable"] for r in rows], dtype=torch.bool),
                 "reference": torch.tensor([r["ref"] for r in rows], dtype=torch.float32)}
        if "kl_ids" in rows[0]:
            batch["kl_input_ids"], batch["kl_attention_mask"] = pad_right([r["kl_ids"] for r in rows], self.pad_id)
            batch["kl_labels"], _ = pad_right([r["kl_labels"] for r in rows], IGNORE)
            batch["kl_reference"] = torch.tensor([r["kl_ref"] for r in rows], dtype=torch.float32)
        return batch


def as_dataset(rows: list, reference: torch.Tensor | None):
    """The rows (`EncodedFeedback`) with their reference log-probs [N, 2] (row, mismatched; NaN when not
    precomputed) as a `datasets.Dataset`."""
    from datasets import Dataset

    ref = reference.tolist() if reference is not None else [[math.nan, math.nan]] * len(rows)
    columns = {"ids": [r.completion.input_ids for r in rows], "labels": [r.completion.labels for r in rows],
               "desirable": [r.desirable for r in rows], "ref": [x[0] for x in ref],
               "length": [len(r.completion.input_ids) for r in rows]}
    if rows and rows[0].mismatched is not None:
        columns.update({"kl_ids": [r.mismatched.input_ids for r in rows],
                        "kl_labels": [r.mismatched.labels for r in rows], "kl_ref": [x[1] for x in ref]})
    return Dataset.from_dict(columns)


def make_trainer(cfg, mode: str, ref_model=None, **kwargs):
    """A `Trainer` whose loss is the configured unpaired loss (`cfg.loss`) against reference `mode`
    (precomputed, frozen_prefix, adapter_disabled or copy)."""
    from transformers import Trainer

    objective = unpaired_loss(cfg.loss)

    class FeedbackTrainer(PairBatchesMixin, Trainer):
        group_by_length = cfg.group_by_length

        def logps(self, model, ids, mask, labels, states=None) -> torch.Tensor:
            # past the autocast accelerate wraps around model.forward (as DPO's), through a wrapper's forward;
            # `states`: start at the first trained block from the frozen prefix's output (`frozen_prefix`)
            top = {} if states is None else {"prefix": states, "start": cfg.freeze_layers}
            with self.accelerator.autocast():
                return distributed.call_through(model, lambda m, *args: sequence_logps(m, *args, **top),
                                                ids, mask, labels)[0]

        def frozen_prefix(self, model, inputs, prefix: str = ""):
            """The frozen bottom blocks' output for the rows or their combinations, once for the policy and
            its reference (`frozen_prefix`); None in the other modes."""
            if mode != "frozen_prefix":
                return None
            inner = self.accelerator.unwrap_model(model)
            with torch.no_grad(), self.accelerator.autocast():
                return frozen_prefix_states(inner, inputs[prefix + "input_ids"], inputs[prefix + "attention_mask"],
                                            inputs[prefix + "labels"], None, cfg.freeze_layers)

        def reference(self, model, inputs, prefix: str = "", states=None) -> torch.Tensor:
            """The reference log-probs of the rows (`prefix` "") or of their mismatched combinations ("kl_")."""
            if mode == "precomputed":
                return inputs[f"{prefix}reference"]
            names = ("input_ids", "attention_mask", "labels")
            ids, mask, labels = (inputs[prefix + name] for name in names)
            with torch.no_grad():
                if mode in ("adapter_disabled", "frozen_prefix"):  # no gradients: the unwrapped model, outside DDP
                    inner = self.accelerator.unwrap_model(model)
                    with inner.disable_adapter():
                        return self.logps(inner, ids, mask, labels, states)
                return self.logps(ref_model, ids, mask, labels)

        def reference_point(self, model, inputs) -> torch.Tensor:
            """z0 of the batch: 0 without mismatched combinations (`kl_estimate: none`)."""
            if "kl_input_ids" not in inputs:
                return torch.zeros((), device=inputs["input_ids"].device)
            states = self.frozen_prefix(model, inputs, "kl_")
            with torch.no_grad():
                policy = self.logps(model, inputs["kl_input_ids"], inputs["kl_attention_mask"], inputs["kl_labels"],
                                    states)
                return reference_point(policy, self.reference(model, inputs, "kl_", states), distributed.reducer())

        def training_step(self, model, inputs, num_items_in_batch=None):
            """z0 over the whole batch, then the rows in one or more passes (module docstring)."""
            from align.data.passes import split_row_batch

            model.train()  # as the Trainer's own step does, before the no-grad pass too
            inputs = self._prepare_inputs(inputs)
            rows = {key: value for key, value in inputs.items() if key not in KL_KEYS}
            rows["z0"] = self.reference_point(model, inputs)
            count = len(rows["input_ids"])
            passes = [(chunk, len(chunk["input_ids"]) / count) for chunk in split_row_batch(rows, self.pass_budget())]
            return self.train_in_passes(model, passes, num_items_in_batch)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            z0 = inputs["z0"] if "z0" in inputs else self.reference_point(model, inputs)
            states = self.frozen_prefix(model, inputs)
            logp = self.logps(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"], states)
            rows = FeedbackLogps(logp, self.reference(model, inputs, "", states).to(logp.device),
                                 inputs["desirable"].to(logp.device))
            z0 = z0.to(logp.device)
            loss, rewards = objective(rows, z0, cfg)
            if model.training:
                check_finite(float(loss.detach()), self.state.global_step + 1)
                self._window.append(window_figures(rows, rewards, z0))
                loss = loss * self.pass_weight  # one of several passes over the batch (`training_step`)
            if return_outputs:
                return loss, torch.stack([rewards, rows.desirable.float(), cfg.beta * z0.expand_as(rewards)], -1)
            return loss

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            """The rows' labels as the label ids: the Trainer calls `compute_metrics` only when there are some."""
            loss, values, _ = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
            return loss, values, values[:, 1]

        def log(self, logs, *args, **kwargs):
            if self._window and "loss" in logs:  # training figures since the last log line
                logs.update(logged_figures(self._window))
                self._window.clear()
            super().log(logs, *args, **kwargs)

    def evaluation(prediction) -> dict:
        """Held-out figures during training (`eval_steps`): label accuracy against each batch's z0, rewards."""
        values = torch.as_tensor(prediction.predictions)
        rewards, desirable, point = values[:, 0], values[:, 1].bool(), values[:, 2]
        right = torch.where(desirable, rewards > point, rewards < point).double() + 0.5 * (rewards == point).double()
        out = {"label_accuracy": float(right.mean())}
        for name, chosen in (("rewards_desirable", desirable), ("rewards_undesirable", ~desirable)):
            if chosen.any():
                out[name] = float(rewards[chosen].mean())
        return out

    trainer = FeedbackTrainer(compute_metrics=evaluation, **kwargs)
    trainer.max_pass_tokens = cfg.max_pass_tokens
    trainer._window = []
    return trainer


def window_figures(rows: FeedbackLogps, rewards: torch.Tensor, z0: torch.Tensor) -> tuple:
    """One pass's figures for the next log line: reward sums and counts by label, z0, rows ranked right."""
    desirable = rows.desirable
    right = label_accuracy(rows.log_ratio().detach(), desirable, z0.detach()) * len(rewards)
    return (float(rewards[desirable].sum()), int(desirable.sum()), float(rewards[~desirable].sum()),
            int((~desirable).sum()), float(z0), right, len(rewards))


def logged_figures(window: list[tuple]) -> dict:
    """The mean figures of the passes since the last log line."""
    d_sum, d_n, u_sum, u_n = (sum(w[i] for w in window) for i in range(4))
    right, rows = sum(w[5] for w in window), sum(w[6] for w in window)
    out = {"kl": round(sum(w[4] for w in window) / len(window), 4), "train_label_accuracy": round(right / rows, 4)}
    if d_n:
        out["rewards_desirable"] = round(d_sum / d_n, 4)
    if u_n:
        out["rewards_undesirable"] = round(u_sum / u_n, 4)
    if d_n and u_n:
        out["rewards_gap"] = round(out["rewards_desirable"] - out["rewards_undesirable"], 4)
    return out
