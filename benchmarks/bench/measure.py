"""Measurements both sides share, so the figures compare like with like: per-step wall time and non-padding
tokens from a `TrainerCallback`, the loss each step logged, peak memory of this process, and MFU on a GPU.

Rates are whole-run totals over identical work (one pass over the same examples on both sides)."""

from __future__ import annotations

import resource
import time

import torch

# Dense bf16 tensor-core peaks (FLOP/s) for MFU; a GPU not listed gets no MFU.
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12,
                 "RTX 4090": 165e12}


class StepClock:
    """Wall time and non-padding tokens of each optimizer step. `tokens_of(batch)` counts a batch's tokens."""

    def __init__(self):
        self.seconds: list[float] = []
        self.tokens: list[int] = []
        self.losses: list[float] = []
        self._last = None

    def start(self) -> None:
        self._last = time.perf_counter()

    def step(self, tokens: int, loss: float | None = None) -> None:
        now = time.perf_counter()
        self.seconds.append(now - self._last)
        self.tokens.append(tokens)
        if loss is not None:
            self.losses.append(loss)
        self._last = now

    def summary(self) -> dict:
        # Every step counts, the first (warm-up) too: both sides make one pass over the same examples, so the
        # totals are the same work, where single steps are not (align batches by length, TRL does not).
        seconds, tokens = sum(self.seconds), sum(self.tokens)
        return {"steps": len(self.seconds),
                "seconds_per_step": round(seconds / max(1, len(self.seconds)), 3),
                "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
                "tokens": sum(self.tokens), "step_seconds": [round(s, 3) for s in self.seconds],
                "step_tokens": self.tokens,
                "loss_mean": round(sum(self.losses) / len(self.losses), 5) if self.losses else None,
                "loss_last": round(self.losses[-1], 5) if self.losses else None,
                "step_losses": [round(x, 5) for x in self.losses]}


def trainer_clock(clock: StepClock):
    """A `TrainerCallback` feeding `clock` from any HF/TRL trainer: tokens from `num_input_tokens_seen`
    (non-padding, both sides set `include_num_input_tokens_seen="non_padding"`), the loss from the log."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        seen = 0
        pending_loss = None

        def on_train_begin(self, args, state, control, **kwargs):
            clock.start()

        def on_step_end(self, args, state, control, **kwargs):
            seen = int(state.num_input_tokens_seen or 0)
            clock.step(seen - self.seen)
            self.seen = seen

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                clock.losses.append(float(logs["loss"]))

    return Clock()


def peak_memory() -> dict:
    """Peak RSS of this process (MB); on a GPU, peak allocated and reserved (MB) too."""
    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)}
    if torch.cuda.is_available():
        out["peak_gpu_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["peak_gpu_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    return out


def mfu(model, tokens_per_second: float | None) -> float | None:
    """Model FLOPs utilisation on a GPU: 6 x parameters x tokens/s over the GPU's dense bf16 peak."""
    if not torch.cuda.is_available() or not tokens_per_second:
        return None
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in GPU_PEAK_BF16.items() if k in name), None)
    if peak is None:
        return None
    params = sum(p.numel() for p in model.parameters())
    return round(6 * params * tokens_per_second / peak, 4)


def settle_threads() -> int:
    """Threads torch uses here (recorded in the table: on a small CPU it decides the figures)."""
    return torch.get_num_threads()
