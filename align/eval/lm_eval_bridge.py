"""An optional bridge to EleutherAI's lm-evaluation-harness (`align eval REF --lm-eval TASKS`).

The registry entry is loaded as align loads it anywhere (adapter chains merged into full-precision
weights) and handed to the harness as an `HFLM` wrapping that model object, so no merged copy is written
to disk. The harness is not a dependency: where it is missing the user is told how to get it.
"""

from __future__ import annotations

import importlib.util

from align.errors import AlignError

INSTALL = "pip install lm-eval"


def available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def require() -> None:
    if not available():
        raise AlignError(f"--lm-eval needs the lm-evaluation-harness, which is not installed: {INSTALL}")


def run_lm_eval(source, registry, tasks: list[str], *, limit: int | None = None, num_fewshot: int | None = None,
                batch_size: int = 8) -> dict:
    """The harness's `results` (per task, per metric) for the model `source` names."""
    require()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from align.models.loading import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(source, registry)
    model = load_causal_lm(source, registry)
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot)
    return out["results"]
