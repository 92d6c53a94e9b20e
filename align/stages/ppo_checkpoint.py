"""PPO's checkpoints: the trainable weights, value head, optimizer, scheduler, KL controller, reward
normalizer and history, written whole under a hidden name and renamed into place, so a crash mid-save leaves
the previous checkpoint in use."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from align.rl.ppo import PPOTrainer
from align.runtime import distributed
from align.runtime.diskspace import disk_guard
from align.stages.context import StageContext
from align.stages.resume import checkpoint_bytes, free_space_hint
from align.stages.run_folder import record_world_size

log = logging.getLogger(__name__)


STATE_FILE = "state.pt"


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
