"""From a KTO stage's data specs to checked, split, tokenized feedback rows, each with the mismatched
combination its KL estimate reads, and the report of what was dropped.

- Rows come from unpaired files or from preference pairs (`align.data.unpaired`); the row policy, the
  dropped-share limit and the report are the pairs' (`align.data.prepare`), counted in the file's rows.
- The held-out split is taken by source row before tokenization and seeded, as for pairs: a pair's two
  rows stay on one side, and a pairs file holds out the same pairs a DPO stage with the same seed does.
- Pairs are tokenized as pairs (`encode_pair`: one prompt truncation for both sides) and then split into
  their desirable and undesirable rows; an unpaired row by the same length rules (`encode_responses`).
- The mismatched combination of a row is its own prompt followed by the completion of one fixed other row
  of the same split, chosen ahead of time by seed: the source rows in a seeded random order, each row
  paired with the row one source row further on (so never with the other side of its own pair), which uses
  every completion of the split once. TRL rotates completions within each batch instead; a partner fixed
  ahead of time lets the reference log-probs of every combination be precomputed once, with the rows', and
  keeps the estimate the same on resume.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass

from align.data.io import fingerprint, read_rows, spec_options
from align.data.preference import PreferencePair
from align.data.prepare import (
    DataReport,
    apply_pair_policy,
    check_dropped_share,
    encode_pairs,
    heldout_split,
    log_report,
)
from align.data.tokenize import IGNORE, Encoded, encode_responses
from align.data.unpaired import FeedbackSet, load_feedback
from align.errors import DataError
from align.objectives.unpaired import weight_advice

log = logging.getLogger(__name__)


@dataclass
class EncodedFeedback:
    """One tokenized row: its sequence (labels on the completion), its label, and, for the KL estimate, its
    prompt with another row's completion (`mismatched`)."""

    completion: Encoded
    desirable: bool
    index: int = -1  # row in the source file; both rows of a pair share it
    from_pair: bool = False
    truncated: str | None = None
    mismatched: Encoded | None = None

    # The two sequences over one prompt, as the pair passes read a pair's sides (`align.stages.dpo_reference.
    # pair_logps`: one prompt pass for both): the row itself, and its mismatched combination (None without one).
    @property
    def chosen(self) -> Encoded:
        return self.completion

    @property
    def rejected(self) -> Encoded | None:
        return self.mismatched

    @property
    def prompt_tokens(self) -> int:
        return first_label(self.completion)


def first_label(encoded: Encoded) -> int:
    return next(i for i, x in enumerate(encoded.labels) if x != IGNORE)


def load_feedback_rows(recipe, spec) -> tuple[FeedbackSet, DataReport]:
    path = recipe.resolve_path(spec.path) if not spec.path.startswith("hf:") else spec.path
    rows = read_rows(path, **spec_options(spec))
    if not rows:
        raise DataError(f"{spec.path}: no rows")
    feedback = load_feedback(rows, str(spec.path), spec.format)
    return feedback, DataReport(source=str(spec.path), fingerprint=fingerprint(path, rows), rows=len(rows))


def encode_feedback(tokenizer, items: list, cfg, report: DataReport) -> list[EncodedFeedback]:
    """Tokenize source rows (pairs or unpaired rows) per the stage's length settings; a pair gives its desirable
    row, then its undesirable one. Refused rows are counted, truncations too."""
    out = []
    pairs = [item for item in items if isinstance(item, PreferencePair)]
    for pair in encode_pairs(tokenizer, pairs, cfg, report):
        out += [EncodedFeedback(pair.chosen, True, pair.index, True, pair.truncated),
                EncodedFeedback(pair.rejected, False, pair.index, True, pair.truncated)]
    for row in (item for item in items if not isinstance(item, PreferencePair)):
        encoded = encode_responses(tokenizer, row.prompt, [row.completion], cfg.max_length, cfg.max_prompt_length,
                                   cfg.truncation)
        if isinstance(encoded, str):
            report.dropped[encoded] += 1
            report.examples.append(f"{report.source}: row {row.index}: {encoded} ({cfg.max_length} tokens)")
            continue
        (completion,), _, truncated = encoded
        if truncated:
            report.truncated[truncated] += 1
        out.append(EncodedFeedback(completion, row.desirable, row.index, False, truncated))
    return out


def add_mismatched(rows: list[EncodedFeedback], seed: int, max_length: int) -> bool:
    """Give every row its mismatched combination (see the module docstring); False, leaving them without,
    when the rows come from fewer than two source rows (no other prompt to combine with)."""
    sizes = Counter(r.index for r in rows)
    if len(sizes) < 2:
        return False
    order = sorted(sizes)
    random.Random(seed).shuffle(order)
    place = {index: k for k, index in enumerate(order)}
    laid = sorted(rows, key=lambda r: (place[r.index], not r.desirable))
    step = max(sizes.values())  # one source row further on: its rows lie together, one or two of them
    for k, row in enumerate(laid):
        other = laid[(k + step) % len(laid)]
        start, other_start = row.prompt_tokens, other.prompt_tokens
        ids = row.completion.input_ids[:start] + other.completion.input_ids[other_start:]
        labels = [IGNORE] * start + other.completion.labels[other_start:]
        row.mismatched = Encoded(ids[:max_length], labels[:max_length])
    return True


def prepare_feedback(recipe, cfg, tokenizer) -> tuple[list[EncodedFeedback], list[EncodedFeedback], DataReport]:
    """Train and held-out rows for a KTO stage, checked, split, tokenized, with their mismatched combinations
    when `cfg.kl_estimate` asks for them, and the report."""
    data, report = load_feedback_rows(recipe, cfg.data)
    apply_pair_policy(data, report, cfg.on_bad_rows)
    eval_report = None
    if cfg.eval_data is not None:
        eval_set, eval_report = load_feedback_rows(recipe, cfg.eval_data)
        apply_pair_policy(eval_set, eval_report, cfg.on_bad_rows)
        train_items, eval_items = data.items, eval_set.items
    else:
        train_idx, eval_idx = heldout_split(len(data.items), cfg.eval_split, cfg.seed)
        train_items, eval_items = [data.items[i] for i in train_idx], [data.items[i] for i in eval_idx]
    train = encode_feedback(tokenizer, train_items, cfg, report)
    heldout = encode_feedback(tokenizer, eval_items, cfg, eval_report or report)
    report.kept = len({r.index for r in train}) + (0 if eval_report else len({r.index for r in heldout}))
    check_dropped_share(report, cfg.max_dropped_share)
    if eval_report is not None:
        eval_report.kept = len({r.index for r in heldout})
        check_dropped_share(eval_report, cfg.max_dropped_share)
    if not train:
        raise DataError(f"{cfg.data.path}: no training rows left after checks")
    if cfg.kl_estimate == "mismatched":
        if not add_mismatched(train, cfg.seed, cfg.max_length):
            raise DataError(f"{cfg.data.path}: the KL estimate (kl_estimate: mismatched) combines each prompt with "
                            "another row's completion, and the training rows come from one source row; add rows "
                            "or set kl_estimate: none")
        if heldout and not add_mismatched(heldout, cfg.seed, cfg.max_length):
            log.warning("%s: one held-out source row: its figures take the reference point as 0",
                        (cfg.eval_data or cfg.data).path)
    advice = weight_advice(*feedback_counts(train), cfg.desirable_weight, cfg.undesirable_weight)
    if advice:
        log.warning("%s: %s", cfg.data.path, advice)
    log_report(report)
    return train, heldout, report


def feedback_counts(rows: list[EncodedFeedback]) -> tuple[int, int]:
    """(desirable, undesirable) rows."""
    desirable = sum(1 for r in rows if r.desirable)
    return desirable, len(rows) - desirable
