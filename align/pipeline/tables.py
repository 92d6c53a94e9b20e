"""Evaluated rows as text: the metrics table (a column per metric some row has) and the samples, shared by
the cross-stage report's report.md and what `align eval` prints."""

from __future__ import annotations

from align.pipeline.comparison import Row


def columns(rows: list[Row], checkers: list[str], against: str = "base") -> list[tuple[str, str, object]]:
    """(metric key, header, formatter) for every column some row has a value for."""
    def num(digits):
        return lambda v: f"{v:.{digits}f}"

    def ms(digits):
        return lambda v: f"{v * 1000:.{digits}f}"

    spec = [("perplexity", "perplexity", num(3))]
    spec += [(f"{c}_pass_rate", c, num(3)) for c in checkers]
    spec += [("reward_mean", "reward", num(3)), ("win_rate", f"win rate vs {against}", num(3)),
             ("response_tokens_mean", "tokens", num(1)), ("distinct_1", "distinct-1", num(3)),
             ("distinct_2", "distinct-2", num(3)), ("eos_rate", "EOS rate", num(2)),
             ("time_to_first_token_s", "first token ms", ms(0)), ("time_per_output_token_s", "ms/token", ms(1)),
             ("tokens_per_s", "tokens/s", num(1))]
    return [c for c in spec if any(isinstance(r.metrics.get(c[0]), (int, float)) for r in rows)]


def markdown_table(rows: list[Row], checkers: list[str], against: str = "base") -> str:
    """One line per row: its label, ref and a cell per column (– where it has no value)."""
    cols = columns(rows, checkers, against)
    lines = ["| entry | ref | " + " | ".join(h for _, h, _ in cols) + " |",
             "|---|---|" + "---:|" * len(cols)]
    for row in rows:
        cells = []
        for key, _, fmt in cols:
            value = row.metrics.get(key)
            cells.append(fmt(value) if isinstance(value, (int, float)) else "–")
        lines.append(f"| {row.label} | `{row.ref}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sample_lines(rows: list[Row]) -> list[str]:
    """The `samples` metric as text: each prompt, then every row's response to it ([] when none has any)."""
    samples = [(r.label, r.metrics.get("samples") or []) for r in rows]
    if not any(s for _, s in samples):
        return []
    lines = []
    first = next(s for _, s in samples if s)
    for i, shown in enumerate(first):
        lines += [f"**Prompt:** {_one_line(shown['prompt'])}", ""]
        for label, s in samples:
            if i < len(s):
                lines.append(f"- {label}: {_one_line(s[i]['response'])}")
        lines.append("")
    return lines


def _one_line(text: str, width: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"
