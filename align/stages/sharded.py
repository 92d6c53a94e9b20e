"""The trained model of a Trainer stage, whole, for the main process to evaluate and register alone.

Why: after training, only the main process runs the evaluation hook and writes the entry (the others wait).
Under DDP and DeepSpeed ZeRO-2 every process holds the whole model, so that is the trainer's own. Under FSDP
and ZeRO-3 each process holds a shard: a forward pass on main alone would wait for the others' shards
forever, and saving would write one shard. So every process takes part in gathering the full state dict
(accelerate's `get_state_dict`, a collective call), and main loads it into a fresh, unsharded copy of the
model built the way the stage built it. With one process nothing of this runs.
"""

from __future__ import annotations

from align.errors import TrainingError
from align.runtime import distributed


def shards_parameters(accelerator) -> bool:
    """True under FSDP or DeepSpeed ZeRO-3 (each process holds part of every weight)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return False


def load_whole(model, state: dict):
    """Load a gathered full state dict into an unsharded copy; every trainable weight must be in it."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    lost = sorted(trainable & set(missing))
    if lost or unexpected:
        raise TrainingError(f"the gathered weights do not fit the model: {len(lost)} trained weights missing "
                            f"(e.g. {lost[:1]}), {len(unexpected)} unexpected (e.g. {list(unexpected)[:1]})")
    return model


def trained_model(trainer, rebuild):
    """The model main evaluates and registers: the trainer's, or under a sharding engine a whole copy built
    by `rebuild()` with the gathered weights (main only; the other processes get None)."""
    if not shards_parameters(trainer.accelerator):
        return trainer.model
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # every process takes part
    if not distributed.is_main():
        return None
    model = load_whole(rebuild(), state)
    return model if getattr(model, "is_loaded_in_4bit", False) else model.to(trainer.args.device)
