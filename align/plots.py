"""PNG pictures written beside registry entries: training curves and reward-score histograms.

matplotlib is imported lazily with the Agg backend, so no display is needed and importing align stays fast.
"""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, ax, xlabel: str, ylabel: str, title: str, path: Path) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def training_curve_png(history: list[dict], path: Path, title: str) -> Path | None:
    """Training and eval loss against step, as a PNG beside the entry's manifest."""
    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h]
    if not train and not evals:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss")
    return _save(plt, fig, ax, "step", "loss", title, path)


def score_histogram_png(chosen: list[float], rejected: list[float], path: Path, title: str) -> Path | None:
    """Overlaid histograms of a reward model's scores for chosen and rejected responses."""
    if not chosen:
        return None
    plt = _pyplot()
    low, high = min(chosen + rejected), max(chosen + rejected)
    bins = [low + (high - low) * i / 30 for i in range(31)] if high > low else 10
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(chosen, bins=bins, alpha=0.6, label=f"chosen (mean {sum(chosen) / len(chosen):.2f})")
    ax.hist(rejected, bins=bins, alpha=0.6, label=f"rejected (mean {sum(rejected) / len(rejected):.2f})")
    return _save(plt, fig, ax, "score", "pairs", title, path)


def margin_histogram_png(margins: list[float], path: Path, title: str) -> Path | None:
    """Histogram of per-pair reward margins (chosen minus rejected); right of zero is a pair ranked right."""
    if not margins:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(margins, bins=30, alpha=0.8, label=f"margin (mean {sum(margins) / len(margins):.3f})")
    ax.axvline(0.0, color="black", linewidth=1)
    return _save(plt, fig, ax, "implicit reward margin (chosen - rejected)", "pairs", title, path)
