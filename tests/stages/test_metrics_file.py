"""`metrics.jsonl` (`align.stages.metrics_file`): one line per step, figures of one step merged into its line, a
resumed run dropping the steps after its checkpoint (and a line torn by a crash), a fresh start emptying the
file, and every line on disk as soon as it is logged."""

from __future__ import annotations

import json

from align.stages.metrics_file import MetricsFile, read_metrics


def test_figures_of_one_step_are_merged_into_its_line(tmp_path):
    metrics = MetricsFile(tmp_path / "metrics.jsonl", None)
    metrics.log(1, {"loss": 2.0})
    metrics.log(2, {"loss": 1.5})
    metrics.log(2, {"eval_loss": 1.7, "step": 99})  # a record's own `step` never overrides the step given
    metrics.log(3, {"loss": 1.2})
    metrics.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [
        {"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "eval_loss": 1.7}, {"step": 3, "loss": 1.2}]


def test_each_line_is_on_disk_as_soon_as_it_is_logged(tmp_path):
    metrics = MetricsFile(tmp_path / "metrics.jsonl", None)
    metrics.log(1, {"loss": 2.0})
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 2.0}]  # before close
    metrics.log(1, {"grad_norm": 0.5})
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 2.0, "grad_norm": 0.5}]
    metrics.close()


def test_a_resumed_run_drops_the_steps_after_its_checkpoint_and_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in range(5)) + '{"step": 5, "lo')
    metrics = MetricsFile(path, resumed_step=2)
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2]
    metrics.log(2, {"train_loss": 1.0})  # the checkpoint's own step: merged into its kept line
    metrics.log(3, {"loss": 30.0})
    metrics.close()
    assert read_metrics(path) == [{"step": 0, "loss": 0.0}, {"step": 1, "loss": 1.0},
                                  {"step": 2, "loss": 2.0, "train_loss": 1.0}, {"step": 3, "loss": 30.0}]


def test_a_fresh_start_empties_the_file(tmp_path):
    path = tmp_path / "runs" / "metrics.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps({"step": 0, "loss": 9.0}) + "\n")
    metrics = MetricsFile(path, resumed_step=None)
    metrics.log(0, {"heldout/eval_loss": 3.0})
    metrics.close()
    assert read_metrics(path) == [{"step": 0, "heldout/eval_loss": 3.0}]
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.jsonl"]  # no temporary file left
