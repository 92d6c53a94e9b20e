"""The web playground's models: each entry loaded once and shared by every column that shows it, answers
streamed token by token with their timings, stoppable, and scored by an optional judge.

Generation runs in a worker thread per answer (transformers' `TextIteratorStreamer` hands the text over);
one set of weights answers one column at a time (a lock per model), while different models answer at
once. A seed makes sampling reproducible: seeded answers take turns on one lock, since torch's random
generator is shared by every thread.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from align.errors import AlignError

_SEEDED = threading.Lock()


@dataclass
class Policy:
    """A loaded model that answers: its weights in eval mode, its tokenizer, the ref that names them."""

    ref: str
    model: object
    tokenizer: object
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Judge:
    """Scores a response to a conversation: a reward model (`kind` reward) or a causal LM with a rubric
    (`kind` generative, `align.rewards.judge`), through the same reward term PPO scores with
    (`align.rewards.mix`), one response at a time."""

    ref: str
    kind: str
    term: object  # an `align.rewards.mix.RewardTerm`
    lock: threading.Lock = field(default_factory=threading.Lock)

    def score(self, messages: list[dict], response: str) -> float:
        with self.lock:
            return float(self.term.score([{"messages": messages}], [response])[0])


def entry_summary(entry) -> dict:
    """What the page shows of a registry entry: kind, stage, lineage and its scalar metrics."""
    manifest = entry.manifest
    parent = manifest.get("parent") or {}
    metrics = {k: v for k, v in (manifest.get("metrics") or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {"ref": entry.ref, "kind": entry.kind, "stage": (manifest.get("stage") or {}).get("kind"),
            "parent": parent.get("ref") or parent.get("id") or parent.get("path"),
            "recipe": (manifest.get("recipe") or {}).get("name"), "created": manifest.get("created"),
            "metrics": metrics}


class Models:
    """The registry's models as the playground uses them: checked, loaded on first use, shared."""

    def __init__(self, registry, dtype: str = "auto", judge: Judge | None = None):
        self.registry, self.dtype, self.judge = registry, dtype, judge
        self._loaded: dict[str, Policy] = {}
        self._loading = threading.Lock()

    # ---------------------------------------------------------------- refs

    def source(self, ref: str):
        """The source `ref` names, refused unless it is a model that answers (no weights loaded)."""
        from align.models.loading import materialize, resolve_model_ref
        from align.pipeline.eval_entry import refuse_reward_entry

        source = materialize(resolve_model_ref(ref, self.registry), self.registry)
        refuse_reward_entry(ref, source)
        return source

    def choices(self) -> list[dict]:
        """Every registry entry that answers (not reward models), newest first, and any other model loaded."""
        entries = [entry_summary(e) for e in self.registry.scan()[0] if e.kind != "reward"]
        entries.sort(key=lambda e: e.get("created") or "", reverse=True)
        known = {e["ref"] for e in entries}
        entries += [{"ref": ref, "kind": "model", "metrics": {}} for ref in self._loaded if ref not in known]
        return entries

    def policy(self, ref: str) -> Policy:
        """The model `ref` names, loaded once; every later call (any column) gets the same weights."""
        from align.models.loading import load_causal_lm, load_tokenizer

        with self._loading:
            source = self.source(ref)
            key = source.entry.ref if source.entry is not None else ref
            if key not in self._loaded:
                tokenizer = load_tokenizer(source, self.registry)
                model = load_causal_lm(source, self.registry, dtype=self.dtype).eval().requires_grad_(False)
                self._loaded[key] = Policy(key, model, tokenizer)
            return self._loaded[key]

    # ---------------------------------------------------------------- answers

    def answer(self, ref: str, messages: list[dict], settings, seed: int | None = None,
               stop: threading.Event | None = None) -> Iterator[dict]:
        """Events for one answer to `messages`: {"type": "text", "text"} as tokens arrive, then one
        {"type": "done", ...} with the whole text, token count, timings and the judge's score."""
        from align.playground.chat import fit_context, room_for_prompt

        policy = self.policy(ref)
        stop = stop or threading.Event()
        messages = [dict(m) for m in messages]
        ids = fit_context(policy.tokenizer, messages, room_for_prompt(policy.model, settings))
        queued = time.perf_counter()
        with policy.lock, (_SEEDED if seed is not None else contextlib.nullcontext()):
            started = time.perf_counter()
            if seed is not None:
                torch.manual_seed(seed)
            if settings.num_beams > 1:  # beam search cannot stream: the answer comes whole
                reply, first = self._generate(policy, ids, settings, None, stop), None
            else:
                streamer = TimedStreamer(policy.tokenizer)
                outcome: dict = {}
                worker = threading.Thread(target=self._generate_into, daemon=True,
                                          args=(policy, ids, settings, streamer, stop, outcome))
                worker.start()
                finished = False
                try:
                    for text in streamer:
                        if text:
                            yield {"type": "text", "text": text}
                    finished = True
                finally:  # the page went away mid-answer: stop, and free the weights only once they are idle
                    if not finished:
                        stop.set()
                    worker.join()
                if "error" in outcome:
                    raise outcome["error"]
                reply, first = outcome["reply"], streamer.first_token_at
            ended = time.perf_counter()
        yield self._done(reply, messages, started, first, ended, started - queued, stop.is_set())

    @staticmethod
    def _generate(policy: Policy, ids, settings, streamer, stop):
        from align.models.generation import generate

        return generate(policy.model, policy.tokenizer, [ids], settings, 1, streamer=streamer, stop=stop)[0]

    def _generate_into(self, policy, ids, settings, streamer, stop, outcome: dict) -> None:
        try:
            outcome["reply"] = self._generate(policy, ids, settings, streamer, stop)
        except Exception as err:  # noqa: BLE001 - re-raised in the request's thread
            outcome["error"] = err
            streamer.end()

    def _done(self, reply, messages, started, first, ended, queued, stopped) -> dict:
        tokens = len(reply.token_ids)
        first = first if first is not None else ended
        done = {"type": "done", "text": reply.text, "tokens": tokens, "ended_with_eos": reply.ended_with_eos,
                "stopped": stopped, "queued_s": round(queued, 4), "ttft_s": round(first - started, 4),
                "tpot_s": round((ended - first) / (tokens - 1), 4) if tokens > 1 else None,
                "tokens_per_s": round(tokens / (ended - started), 2) if ended > started else None,
                "score": None, "judge": None}
        if self.judge is not None and reply.text.strip():
            done["score"], done["judge"] = round(self.judge.score(messages, reply.text), 4), self.judge.ref
        return done


def TimedStreamer(tokenizer):  # noqa: N802 - builds a transformers class on first use
    """A `TextIteratorStreamer` (response text only) that notes when the first response token arrived."""
    from transformers import TextIteratorStreamer

    class Timed(TextIteratorStreamer):
        first_token_at: float | None = None

        def put(self, value):
            if self.first_token_at is None and not (self.skip_prompt and self.next_tokens_are_prompt):
                self.first_token_at = time.perf_counter()
            super().put(value)

    return Timed(tokenizer, skip_prompt=True, skip_special_tokens=True)


def load_judge(ref: str, registry, rubric: str | None = None, mode: str = "yes_no", dtype: str = "auto") -> Judge:
    """The judge `ref` names: a reward model scores as it is; a causal LM needs a `rubric` (it then judges
    by its yes/no verdict or its 1-10 rating, `mode`). Refused with the reason before any weights load."""
    from align.models.loading import materialize, resolve_model_ref
    from align.rewards.judge import judge_problem, load_generative_judge
    from align.rewards.mix import judge_term, reward_model_term
    from align.rewards.scoring import load_reward_model, reward_problem

    source = materialize(resolve_model_ref(ref, registry), registry)
    label = source.entry.ref if source.entry is not None else ref
    if reward_problem(source) is None and source.kind in ("registry", "local"):
        if rubric:
            raise AlignError(f"--judge {ref}: {label} is a reward model; it scores without a rubric (drop --rubric)")
        model, tokenizer = load_reward_model(source, registry, dtype=dtype)
        return Judge(label, "reward", reward_model_term(label, 1.0, model, tokenizer, batch_size=1))
    why = judge_problem(source)
    if why:
        raise AlignError(f"--judge {ref}: {why}")
    if not rubric:
        raise AlignError(f"--judge {ref}: {label} is not a reward model; to judge with a language model, say what "
                         'a good answer is: --rubric "Is the response helpful, correct and concise?"')
    judge = load_generative_judge(source, registry, rubric, mode, batch_size=1)
    return Judge(label, "generative", judge_term(label, 1.0, judge))
