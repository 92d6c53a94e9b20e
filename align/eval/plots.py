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


def score_histogram_png(chosen: list[float], rejected: list[float], path: Path, title: str,
                        names: tuple[str, str] = ("chosen", "rejected"), xlabel: str = "score",
                        ylabel: str = "pairs") -> Path | None:
    """Overlaid histograms of a reward model's scores for chosen and rejected responses (or of any two groups'
    values, `names`: KTO's implicit rewards of desirable and undesirable rows)."""
    if not chosen and not rejected:
        return None
    plt = _pyplot()
    low, high = min(chosen + rejected), max(chosen + rejected)
    bins = [low + (high - low) * i / 30 for i in range(31)] if high > low else 10
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for values, name in zip((chosen, rejected), names):
        if values:
            ax.hist(values, bins=bins, alpha=0.6, label=f"{name} (mean {sum(values) / len(values):.2f})")
    return _save(plt, fig, ax, xlabel, ylabel, title, path)


def margin_histogram_png(margins: list[float], path: Path, title: str) -> Path | None:
    """Histogram of per-pair reward margins (chosen minus rejected); right of zero is a pair ranked right."""
    if not margins:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(margins, bins=30, alpha=0.8, label=f"margin (mean {sum(margins) / len(margins):.3f})")
    ax.axvline(0.0, color="black", linewidth=1)
    return _save(plt, fig, ax, "implicit reward margin (chosen - rejected)", "pairs", title, path)


def _finish(plt, fig, title: str, path: Path) -> Path:
    """Title a multi-panel figure, write it as a PNG and free it."""
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def rl_curves_png(history: list[dict], path: Path, title: str) -> Path | None:
    """RL training at a glance: reward (total and per source), per-token KL, entropy, response length and
    EOS share, clip fraction and value loss, each against step."""
    steps = [h["step"] for h in history if "reward" in h]
    if not steps:
        return None
    rows = [h for h in history if "reward" in h]
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    panels = [("reward", [k for k in rows[-1] if k == "reward" or k.startswith("reward/")]),
              ("KL per token (nats)", ["kl_per_token"]), ("entropy per token", ["entropy"]),
              ("response tokens", ["response_length"]), ("EOS share", ["eos_rate"]),
              ("update", ["clip_fraction", "value_loss", "explained_variance"])]
    for ax, (label, keys) in zip(axes.flat, panels):
        for key in keys:
            points = [(h["step"], h[key]) for h in rows if h.get(key) is not None]
            if points:
                ax.plot(*zip(*points), label=key)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    return _finish(plt, fig, title, path)


def reward_histogram_png(before: list[float], after: list[float], path: Path, title: str) -> Path | None:
    """Held-out rewards of the parent (before) and of the trained policy (after), overlaid."""
    if not after:
        return None
    plt = _pyplot()
    values = before + after
    low, high = min(values), max(values)
    bins = [low + (high - low) * i / 30 for i in range(31)] if high > low else 10
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if before:
        ax.hist(before, bins=bins, alpha=0.6, label=f"before (mean {sum(before) / len(before):.3f})")
    ax.hist(after, bins=bins, alpha=0.6, label=f"after (mean {sum(after) / len(after):.3f})")
    return _save(plt, fig, ax, "reward", "held-out prompts", title, path)


def history_curves_png(histories: dict[str, list[dict]], path: Path, title: str) -> Path | None:
    """Several entries' logged training histories side by side: training loss (and eval loss, dashed) for
    the entries that log a loss, RL reward for those that log one, each against step."""
    panels = [("loss", [(label, h) for label, h in histories.items() if any("loss" in r for r in h)]),
              ("reward (RL)", [(label, h) for label, h in histories.items() if any("reward" in r for r in h)])]
    panels = [(name, series) for name, series in panels if series]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.5), squeeze=False)
    for ax, (name, series) in zip(axes[0], panels):
        key = "loss" if name == "loss" else "reward"
        for label, history in series:
            points = [(r["step"], r[key]) for r in history if key in r and "step" in r and r[key] is not None]
            if points:
                line, = ax.plot(*zip(*points), label=label)
                if key == "loss":
                    evals = [(r["step"], r["eval_loss"]) for r in history
                             if r.get("eval_loss") is not None and "step" in r]
                    if evals:
                        ax.plot(*zip(*evals), linestyle="--", marker="o", color=line.get_color(),
                                label=f"{label} (eval)")
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.legend(fontsize=8)
    return _finish(plt, fig, title, path)


def score_distributions_png(scores: dict[str, list[float]], path: Path, title: str) -> Path | None:
    """Overlaid histograms of each entry's per-prompt scores (e.g. the judge's reward of its responses)."""
    scores = {label: values for label, values in scores.items() if values}
    if not scores:
        return None
    plt = _pyplot()
    values = [v for vs in scores.values() for v in vs]
    low, high = min(values), max(values)
    bins = [low + (high - low) * i / 30 for i in range(31)] if high > low else 10
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for label, vs in scores.items():
        ax.hist(vs, bins=bins, histtype="step", linewidth=1.5, label=f"{label} (mean {sum(vs) / len(vs):.3f})")
    return _save(plt, fig, ax, "score", "prompts", title, path)
