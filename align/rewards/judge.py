"""A causal LM as a judge: each response scored against a rubric in one forward pass, without generating.

Why it is built this way:
- Any causal LM can judge: it is asked, in its own chat template, one fixed question around the rubric (put
  in verbatim), the conversation's prompt and the response, and its verdict is read from the distribution
  of its first answer token. One pass per row, no sampling and no parsing, and the score is continuous, so
  the k samples of a GRPO group rarely tie.
- `yes_no`: log P(Yes) - log P(No), each word's probability summed over its one-token spellings (`Yes`,
  ` Yes`, `yes`, ` yes`, `YES`, ` YES`); a spelling counts only where both words have it as one token, so
  neither answer gets more spellings than the other. `scale`: the expected rating sum_k k P(k) / sum_k P(k)
  over the digit tokens. `10` counts only where it is one token; where it is not (SmolLM2 and other
  tokenizers that split numbers into digits) the question asks for 1 to 9 instead, so that a judge meaning
  10 never puts its mass on `1`.
- Rows are right-padded and read at each row's last real token (so padding never shifts a row's positions);
  the trunk runs under the machine's no-grad autocast (`align.runtime.precision`), the LM head only on the
  candidate tokens' rows, in fp32 (bf16 logits would round the verdicts into ties).
- Scores are cached for the process by a hash of (judge, rubric, mode, prompt, response): GRPO groups repeat
  responses, and the held-out responses are judged again by the evaluation hook.
- A judge's weights load once per process and are shared by every reward term and by the evaluation hook
  that name the same model (`judge_model`); the policy is never the judge: it trains, the judge must not.
  The cost is one more copy of the judge's weights in memory and one forward pass per new response.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from align.data.sampling import length_sorted_chunks, pad_right
from align.data.tokenize import encode_prompt
from align.errors import AlignError
from align.models.logprobs import capped, causal_parts, logit_softcap
from align.runtime.precision import inference_autocast

TEMPLATE = ("You are judging an assistant's response to a prompt.\n\nRubric: {rubric}\n\nPrompt:\n{prompt}\n\n"
            "Response:\n{response}\n\n{question}")
QUESTIONS = {"yes_no": "Does the response meet the rubric? Answer Yes or No.",
             "scale": "How well does the response meet the rubric? Rate from 1 to {top}. Answer with the number only."}
PLAIN_ANSWER = "\n\nAnswer:"  # after the question where the judge's tokenizer has no chat template
JUDGE_ARGS = {"batch_size": "rows per forward pass (a positive integer)"}
CACHE_SIZE = 200_000  # scores kept (a few tens of MB at most)


class JudgeError(AlignError):
    """A judge that cannot read its verdict with this tokenizer."""


# ------------------------------------------------------------------------------------------ verdict tokens


def one_token(tokenizer, text: str) -> int | None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def spellings(word: str) -> tuple[str, ...]:
    return tuple(form for w in (word, word.lower(), word.upper()) for form in (w, " " + w))


def yes_no_ids(tokenizer) -> tuple[list[int], list[int]]:
    """The token ids of Yes and of No: the spellings that are one token for both words."""
    pairs = [(one_token(tokenizer, y), one_token(tokenizer, n)) for y, n in zip(spellings("Yes"), spellings("No"))]
    pairs = list(dict.fromkeys((y, n) for y, n in pairs if y is not None and n is not None and y != n))
    if not pairs:
        raise JudgeError("the judge's tokenizer has no one-token spelling of both Yes and No; use judge_score: scale")
    return list(dict.fromkeys(y for y, _ in pairs)), list(dict.fromkeys(n for _, n in pairs))


def scale_ids(tokenizer) -> dict[int, list[int]]:
    """The token ids of each rating: 1 to 10 where `10` is one token, else 1 to 9 (and the question says so)."""
    top = 10 if one_token(tokenizer, "10") is not None else 9
    points = {}
    for k in range(1, top + 1):
        ids = [i for i in (one_token(tokenizer, str(k)), one_token(tokenizer, f" {k}")) if i is not None]
        if not ids:
            raise JudgeError(f"the judge's tokenizer has no one-token spelling of {k}; use judge_score: yes_no")
        points[k] = list(dict.fromkeys(ids))
    return points


def tokenizer_problem(tokenizer, mode: str) -> str | None:
    """Why this tokenizer cannot give `mode`'s verdict (checked at plan time where it is on disk), or None."""
    try:
        yes_no_ids(tokenizer) if mode == "yes_no" else scale_ids(tokenizer)
    except JudgeError as err:
        return str(err)
    return None


# ------------------------------------------------------------------------------------------ prompts


def conversation_text(messages: list[dict]) -> str:
    """The prompt the judge reads: a single user turn as it is, a longer conversation one `role: text` a turn."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def judge_text(rubric: str, mode: str, messages: list[dict], response: str, top: int = 10) -> str:
    """The judge's user message: the fixed template around the rubric (verbatim), the prompt and the response."""
    return TEMPLATE.format(rubric=rubric, prompt=conversation_text(messages), response=response,
                           question=QUESTIONS[mode].format(top=top))


def judge_ids(tokenizer, text: str) -> list[int]:
    """The judge's input ids: `text` as a user turn in its chat template with the assistant header, or with
    no template the plain text followed by `Answer:`."""
    if getattr(tokenizer, "chat_template", None):
        return encode_prompt(tokenizer, [{"role": "user", "content": text}])
    return tokenizer(text + PLAIN_ANSWER)["input_ids"]


# ------------------------------------------------------------------------------------------ scoring


@torch.no_grad()
def candidate_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     candidates: torch.Tensor) -> torch.Tensor:
    """Next-token logits [B, C] of the `candidates` token ids after each right-padded row's last real token:
    the trunk under the machine's no-grad autocast, the head's candidate rows in fp32."""
    trunk, head = causal_parts(model)
    with inference_autocast(model):
        hidden = trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    last = hidden[torch.arange(hidden.size(0), device=hidden.device), attention_mask.sum(dim=-1) - 1]
    ids = candidates.to(head.weight.device)
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        logits = last.float() @ head.weight[ids].float().t()
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[ids].float()
    return capped(logits, logit_softcap(model))  # as the model's forward caps them (Gemma 2)


def verdicts(logits: torch.Tensor, groups: list[list[int]], mode: str, values: list[int]) -> torch.Tensor:
    """Scores [B] from candidate logits [B, C]; `groups` are the columns of each answer (Yes then No, or each
    rating, whose number is in `values`)."""
    per_answer = torch.stack([torch.logsumexp(logits[:, cols], dim=-1) for cols in groups], dim=-1)
    if mode == "yes_no":
        return per_answer[:, 0] - per_answer[:, 1]
    weights = torch.softmax(per_answer, dim=-1)
    return (weights * torch.tensor(values, dtype=weights.dtype, device=weights.device)).sum(dim=-1)


_SCORES: OrderedDict[str, float] = OrderedDict()


def cache_key(ref: str, rubric: str, mode: str, messages: list[dict], response: str) -> str:
    return hashlib.sha256(json.dumps([ref, rubric, mode, messages, response]).encode()).hexdigest()


def clear_scores() -> None:
    """Forget every cached score (a judge whose weights changed under the same ref, tests)."""
    _SCORES.clear()


@dataclass
class JudgeModel:
    """A loaded judge: weights frozen in eval mode, its tokenizer, and the ref that names them."""

    ref: str
    model: object
    tokenizer: object


@dataclass
class GenerativeJudge:
    """A causal LM (`weights`) that scores (prompt row, response) pairs against `rubric`."""

    weights: JudgeModel
    rubric: str
    mode: str = "yes_no"
    batch_size: int = 16
    forward_passes: int = field(default=0, init=False)  # batches run, cached scores aside

    @property
    def ref(self) -> str:
        return self.weights.ref

    @property
    def model(self):
        return self.weights.model

    @property
    def tokenizer(self):
        return self.weights.tokenizer

    def __post_init__(self):
        if self.mode == "yes_no":
            yes, no = yes_no_ids(self.tokenizer)
            answers, self.values = [yes, no], [1, 0]
        else:
            points = scale_ids(self.tokenizer)
            answers, self.values = list(points.values()), list(points)
        flat = [i for ids in answers for i in ids]
        self.candidates = torch.tensor(flat, dtype=torch.long)
        starts = [sum(len(ids) for ids in answers[:k]) for k in range(len(answers))]
        self.groups = [list(range(s, s + len(ids))) for s, ids in zip(starts, answers)]
        self.top = max(self.values) if self.mode == "scale" else 10

    def encode(self, messages: list[dict], response: str) -> list[int]:
        return judge_ids(self.tokenizer, judge_text(self.rubric, self.mode, messages, response, self.top))

    def score(self, rows: list[dict], texts: list[str]) -> list[float]:
        """One score per (row, response); each distinct pair not scored before in this process is run once."""
        keys = [cache_key(self.ref, self.rubric, self.mode, row["messages"], text) for row, text in zip(rows, texts)]
        todo = {key: i for i, key in reversed(list(enumerate(keys))) if key not in _SCORES}
        if todo:
            firsts = list(todo.values())
            for key, value in zip(todo, self._score_new([rows[i]["messages"] for i in firsts],
                                                        [texts[i] for i in firsts])):
                _SCORES[key] = value
        scores = [_SCORES[key] for key in keys]
        while len(_SCORES) > CACHE_SIZE:  # the oldest first, once this batch's scores are read
            _SCORES.popitem(last=False)
        return scores

    def _score_new(self, prompts: list[list[dict]], texts: list[str]) -> list[float]:
        sequences = [self.encode(messages, text) for messages, text in zip(prompts, texts)]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        device = next(self.model.parameters()).device
        scores = [0.0] * len(sequences)
        for chunk in length_sorted_chunks([len(s) for s in sequences], self.batch_size):
            ids, mask = pad_right([sequences[i] for i in chunk], pad)
            logits = candidate_logits(self.model, ids.to(device), mask.to(device), self.candidates)
            self.forward_passes += 1
            for i, value in zip(chunk, verdicts(logits, self.groups, self.mode, self.values).tolist()):
                scores[i] = value
        return scores


# ------------------------------------------------------------------------------------------ loading


def judge_problem(source, instead: str = "use `model:` instead of `judge:`") -> str | None:
    """Why `source` cannot judge (it is a reward model, or not a causal LM), checked without loading weights;
    `instead` says what to write for a reward model. A hub id is checked when it loads."""
    label = source.entry.ref if source.entry is not None else source.ref
    if source.entry is not None:
        return f"{label} is a reward model, not a causal LM; {instead}" if source.entry.kind == "reward" else None
    if source.kind == "local":
        config = json.loads((Path(source.path) / "config.json").read_text())
        architectures = config.get("architectures") or []
        if any(a.endswith("ForSequenceClassification") for a in architectures):
            return f"{source.path} is a sequence classifier (a reward model), not a causal LM; {instead}"
        if architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
            return f"{source.path} is not a causal LM (architectures: {architectures})"
    return None


def judge_args_problem(args) -> str | None:
    """Why a judge source's `args` are wrong (`JUDGE_ARGS` only), or None."""
    unknown = [key for key in args if key not in JUDGE_ARGS]
    if unknown:
        return (f"a judge takes no {', '.join(map(repr, unknown))}; its args: "
                + ", ".join(f"{k} ({why})" for k, why in JUDGE_ARGS.items()))
    size = args.get("batch_size", 1)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        return f"batch_size must be a positive integer, got {size!r}"
    return None


_LOADED: weakref.WeakValueDictionary[str, JudgeModel] = weakref.WeakValueDictionary()


def judge_model(source, registry) -> JudgeModel:
    """The judge `source` names, loaded once per process while any `GenerativeJudge` on it lives (a reward
    term, the eval hook's judge): same ref, same weights."""
    from align.models.loading import load_causal_lm, load_tokenizer, materialize
    from align.runtime import distributed

    source = materialize(source, registry)
    ref = source.entry.ref if source.entry is not None else source.ref
    loaded = _LOADED.get(ref)
    if loaded is None:
        why = judge_problem(source)
        if why:
            raise JudgeError(why)
        tokenizer = load_tokenizer(source, registry)
        model = load_causal_lm(source, registry).eval().requires_grad_(False)
        if torch.cuda.is_available():
            model.to(distributed.device())
        loaded = _LOADED[ref] = JudgeModel(ref, model, tokenizer)
    return loaded


def load_generative_judge(source, registry, rubric: str, mode: str = "yes_no",
                          batch_size: int = 16) -> GenerativeJudge:
    """A judge with its rubric and mode on the (shared) weights `source` names."""
    return GenerativeJudge(judge_model(source, registry), rubric, mode, batch_size)
