"""What the tracking tests share: tiny one-stage recipes of each kind, a run killed at step 4, and readers of
what each tracker wrote (TensorBoard events, W&B's offline `.wandb` files, an MLflow store)."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest

from align.config.loading import validate_recipe
from align.pipeline.run import run_recipe
from align.registry.store import Registry
from tests.conftest import EVAL_ROWS, SFT_ROWS, write_jsonl

PAIRS = [{"prompt": f"Question {i}: can you help?", "chosen": ["Sure, glad to help.", "Of course."][i % 2],
          "rejected": ["No. Go away.", "Leave me alone."][i % 3 % 2]} for i in range(24)]
PROMPTS = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(6) for b in range(6)]
COMMON = {"max_steps": 3, "batch_size": 4, "logging_steps": 1, "save_steps": 2, "lr": 5e-3, "scheduler": "constant",
          "eval_split": 0.25, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
PPO = {"rewards": [{"checker": "regex", "args": {"pattern": "[0-9]"}}], "rollout_batch": 8, "minibatch": 8,
       "batch_size": 8, "ppo_epochs": 1, "generation": {"max_new_tokens": 4, "temperature": 1.0},
       "kl": {"coef": 0.01}, "eval_split": 0.1}

# Each kind's headline figure as every tracker names it (a Trainer's `loss` is `train/loss`, as transformers'
# trackers name it; PPO's figures keep their own names) and its name in metrics.jsonl and the history.
HEADLINE = {"sft": ("train/loss", "loss"), "reward": ("train/loss", "loss"), "dpo": ("train/loss", "loss"),
            "ppo": ("reward", "reward")}


def raw_recipe(folder: Path, base, kind: str, stage: dict | None = None) -> dict:
    body = {"sft": {"data": str(write_jsonl(folder / "sft.jsonl", SFT_ROWS))},
            "reward": {"data": str(write_jsonl(folder / "prefs.jsonl", PAIRS)), "gate": {"min_accuracy": 0.0}},
            "dpo": {"data": str(write_jsonl(folder / "prefs.jsonl", PAIRS))},
            "ppo": {"from": "base", "prompts": str(write_jsonl(folder / "prompts.jsonl", PROMPTS)), **PPO}}[kind]
    prompts = write_jsonl(folder / "eval_prompts.jsonl", EVAL_ROWS)
    return {"name": "tiny", "base": str(base), "stages": {kind: {**COMMON, **body, **(stage or {})}},
            "eval": {"metrics": ["loss", "checkers"], "prompts": str(prompts), "checkers": ["math_answer"],
                     "generation": {"max_new_tokens": 4}, "limit": 2}}


def run_stage(folder: Path, base, kind: str, stage: dict | None = None):
    """Run a one-stage recipe of `kind` in `folder`; its entry."""
    recipe = validate_recipe(raw_recipe(folder, base, kind, stage), [], source=str(folder / "r.yaml"))
    registry = Registry(folder / "registry")
    return run_recipe(recipe, registry, runs_root=folder / "runs")[kind]


def run_killed_at_step_4(folder: Path, base, stage: dict, monkeypatch) -> None:
    """Run an SFT stage that dies at the first micro-batch of step 4 (after checkpoint-2 was written)."""
    from align.stages import callbacks

    real = callbacks.check_finite

    class Crash(Exception):
        pass

    def crash_at_step_4(value: float, step: int) -> None:
        if step == 4:
            raise Crash("killed at step 4")
        real(value, step)

    monkeypatch.setattr(callbacks, "check_finite", crash_at_step_4)
    with pytest.raises(Crash):
        run_stage(folder, base, "sft", stage)


def by_step(records: list[dict], key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in records if r.get(key) is not None}


# ------------------------------------------------------------------------------------------ TensorBoard


def tb_events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    events.Reload()
    return events


def tb_scalars(events, tag: str) -> dict[int, float]:
    points = events.Scalars(tag)
    steps = [p.step for p in points]
    assert len(steps) == len(set(steps)), f"{tag}: a step logged twice: {steps}"
    return {p.step: p.value for p in points}


def tb_text(events, tag: str) -> str:
    return events.Tensors(f"{tag}/text_summary")[-1].tensor_proto.string_val[0].decode()


def tb_hparams(folder: Path) -> dict:
    """The hyperparameters TensorBoard's hparams plugin shows for the run in `folder`."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import (
        EventAccumulator,
    )
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(folder))
    events.Reload()
    content = events.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    values = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    return {key: value.string_value or value.number_value for key, value in values.items()}


# ------------------------------------------------------------------------------------------ W&B


def wandb_records(path: Path):
    """The records of a `.wandb` file (W&B 0.31 ships no reader of its own in Python): LevelDB's log
    format, 32 KiB blocks of chunks each with a 7-byte header (checksum, length, type: full, first, middle,
    last), after a 7-byte file header `:W&B`, magic, version; each record a `wandb_internal_pb2.Record`."""
    from wandb.proto import wandb_internal_pb2

    data, block, position, pieces = Path(path).read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B", f"{path}: not a W&B transaction log"
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's last bytes are padding when no header fits
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 2):
            pieces = chunk
        elif kind in (3, 4):
            pieces += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            yield record


def wandb_run(folder: Path, run_id: str) -> dict:
    """What the offline W&B run `run_id` under `folder` holds, over all its attempts (a resumed run writes a
    new `offline-run-*-<id>` folder): its runs' records, config, history rows (user keys), summary, and the
    x-axis of each metric pattern."""
    # `offline-run-<start time>-<id>`, with `-<n>` after it when an attempt started in the same second
    named = re.compile(rf"offline-run-(\d{{8}}_\d{{6}})-{re.escape(run_id)}(?:-(\d+))?")
    found = [(m.group(1), int(m.group(2) or 0), path) for path in (folder / "wandb").iterdir()
             if (m := named.fullmatch(path.name))]
    attempts = [path for *_, path in sorted(found)]
    run = {"attempts": attempts, "runs": [], "config": {}, "history": [], "summary": {}, "x_axis": {}}
    for attempt in attempts:
        for record in wandb_records(attempt / f"run-{run_id}.wandb"):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["runs"].append(record.run)
                run["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "config":
                run["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif kind == "history":
                row = {}
                for item in record.history.item:  # a dict value (an image's) comes as one item per key
                    *parents, key = [item.key] if item.key else list(item.nested_key)
                    place = row
                    for parent in parents:
                        place = place.setdefault(parent, {})
                    place[key] = json.loads(item.value_json)
                run["history"].append({k: v for k, v in row.items() if not k.startswith("_")})
            elif kind == "metric" and record.metric.step_metric:  # `define_metric(name, step_metric=...)`
                run["x_axis"][record.metric.glob_name or record.metric.name] = record.metric.step_metric
            elif kind == "summary":
                run["summary"].update({i.key: json.loads(i.value_json) for i in record.summary.update if i.key})
    return run


def wandb_points(history: list[dict], key: str) -> dict[int, float]:
    """`key` by training step (the `step` each row carries), each step once."""
    steps = [row["step"] for row in history if key in row]
    assert len(steps) == len(set(steps)), f"{key}: a step logged twice: {steps}"
    return {row["step"]: row[key] for row in history if key in row}


# ------------------------------------------------------------------------------------------ MLflow


def mlflow_points(client, run_id: str, key: str) -> dict[int, float]:
    points = client.get_metric_history(run_id, key)
    steps = [p.step for p in points]
    assert len(steps) == len(set(steps)), f"{key}: a step logged twice: {steps}"
    return {p.step: p.value for p in points}
