"""The benchmark's report: one Markdown table (align vs plain TRL per stage, with the ratio) and the same
figures as JSON, headed by what was measured on which machine."""

from __future__ import annotations

import json
import os
from pathlib import Path


def machine() -> dict:
    import torch

    from align.runtime.precision import device_facts

    out = {"cpu": device_facts("cpu").name, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "device": device_facts().describe(), "native_bf16": device_facts("cpu").bf16,
           "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    try:
        import transformers
        import trl

        out.update(transformers=transformers.__version__, trl=trl.__version__)
    except ImportError:
        pass
    return out


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _ratio(ours, theirs, higher_better: bool = True) -> str:
    """How many times better ours is: a rate's ratio, or for seconds the inverse."""
    if not ours or not theirs:
        return "–"
    return f"{(ours / theirs if higher_better else theirs / ours):.2f}x"


def markdown(report: dict) -> str:
    m, w = report["machine"], report["workload"]
    lines = [f"# align benchmark ({'tiny model' if w['tiny'] else w['model']})", "",
             f"- machine: {m['cpu']}, {m['cores']} cores, native bf16 on the CPU: "
             f"{'yes' if m.get('native_bf16') else 'no'}, torch {m['torch']} with {m['torch_threads']} threads"
             + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"),
             f"- compute device: {m.get('device', '?')}",
             f"- model: {w['model']}; LoRA {w['lora']}; both sides in their own process, TRL first",
             *[f"- {stage} data: {path}" for stage, path in w["data"].items() if stage in report["stages"]], "",
             "| stage | side | steps | tokens/s | s/step | peak RSS MB | GPU alloc/reserved MB | MFU | train loss (mean) "
             "| held-out loss | speed vs TRL |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for stage, sides in report["stages"].items():
        trl_side = sides.get("trl") or {}
        for side, r in sides.items():
            if "error" in r:
                lines.append(f"| {stage} | {side} | failed: {r['error'][:120]} |||||||||")
                continue
            gpu = (f"{fmt(r.get('peak_gpu_allocated_mb'), 0)}/{fmt(r.get('peak_gpu_reserved_mb'), 0)}"
                   if r.get("peak_gpu_allocated_mb") is not None else "–")
            speed = "" if side == "trl" else (
                _ratio(r.get("tokens_per_second"), trl_side.get("tokens_per_second")) if r.get("tokens_per_second")
                else _ratio(r.get("seconds_per_step"), trl_side.get("seconds_per_step"), higher_better=False))
            lines.append(f"| {stage} | {side} | {fmt(r.get('steps'))} | {fmt(r.get('tokens_per_second'))} | "
                         f"{fmt(r.get('seconds_per_step'), 2)} | {fmt(r.get('peak_rss_mb'), 0)} | {gpu} | "
                         f"{fmt(r.get('mfu'), 3)} | {fmt(r.get('loss_mean'), 4)} | {fmt(r.get('heldout_loss'), 4)} | "
                         f"{speed} |")
    ppo = report["stages"].get("ppo")
    if ppo:
        lines += ["", "PPO step split (seconds per step; rollout tokens/s is generated tokens over generation time):",
                  "", "| side | generation | scoring | training | rollout tokens/s | responses/step | mean response tokens "
                  "| mean reward |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for side, r in ppo.items():
            if "error" not in r and r:
                lines.append(f"| {side} | {fmt(r.get('generation_seconds'), 2)} | {fmt(r.get('scoring_seconds'), 2)} | "
                             f"{fmt(r.get('training_seconds'), 2)} | {fmt(r.get('rollout_tokens_per_second'))} | "
                             f"{fmt(r.get('responses_per_step'))} | {fmt(r.get('mean_response_tokens'))} | "
                             f"{fmt(r.get('mean_reward'), 3)} |")
    sweep = [line for stage, sides in report["stages"].items() if (line := sweep_line(stage, sides))]
    if sweep:
        lines += ["", "Precision sweep (align side; rate is tokens/s, else steps/s):", "", *sweep]
    extra = [f"- {stage}: {note}" for stage, sides in report["stages"].items()
             for side, r in sides.items() if side.startswith("align") for note in r.get("notes", [])]
    if extra:
        lines += ["", *extra]
    lines += ["", "tokens/s: non-padding tokens over wall time of all steps (one pass over the same examples on both sides, "
              "so the same work; single steps differ, align batching by length); "
              "train loss is the mean over the steps, which see the same examples on both sides (one pass, "
              "different order); held-out loss is measured after training by the same fp32 function on both sides."]
    return "\n".join(lines) + "\n"


def sweep_line(stage: str, sides: dict) -> str | None:
    """`auto` against the fastest precision of a sweep, or None when the stage ran one precision."""
    def rate(r: dict) -> float | None:
        if "error" in r:
            return None
        return r.get("tokens_per_second") or (1 / r["seconds_per_step"] if r.get("seconds_per_step") else None)

    rates = {r["precision"]: rate(r) for side, r in sides.items() if side.startswith("align ") and "precision" in r}
    rates = {p: v for p, v in rates.items() if v}
    if len(rates) < 2 or "auto" not in rates:
        return None
    fastest = max(rates, key=rates.get)
    figures = ", ".join(f"{p} {v:.3g}" for p, v in rates.items())
    return (f"- {stage}: {figures}; auto at {rates[fastest] / rates['auto']:.2f}x the time of the fastest "
            f"({fastest})")


def write(report: dict, folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    md, js = folder / "bench.md", folder / "bench.json"
    md.write_text(markdown(report))
    js.write_text(json.dumps(report, indent=2))
    return md, js
