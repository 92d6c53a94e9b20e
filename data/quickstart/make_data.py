"""Writes the quickstart's arithmetic data (deterministic; run `python data/quickstart/make_data.py`).

Demonstrations answer with a short worked line and a final `#### <number>`, the format the `math_answer`
and `answer_format` checkers read. Preference pairs (for the reward stage) prefer that answer over a wrong
number in the same format, or over the right number without the format. RL prompts (for PPO) carry only
the question and its answer. Training, preference and evaluation problems never share operands; RL
prompts never share them with evaluation problems.
"""

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).parent
TEMPLATES = {
    "+": ["What is {a} + {b}?", "Compute {a} plus {b}.", "Add {a} and {b}.",
          "{name} has {a} marbles and finds {b} more. How many marbles does {name} have now?"],
    "-": ["What is {a} - {b}?", "Compute {a} minus {b}.", "Subtract {b} from {a}.",
          "{name} had {a} stickers and gave away {b}. How many stickers are left?"],
    "*": ["What is {a} * {b}?", "Compute {a} times {b}.", "Multiply {a} by {b}.",
          "{name} buys {a} boxes with {b} pencils each. How many pencils is that?"],
}
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana"]


def problem(rng: random.Random, op: str, seen: set) -> dict:
    while True:
        if op == "*":
            a, b = rng.randint(2, 19), rng.randint(2, 12)
        else:
            a, b = rng.randint(10, 99), rng.randint(1, 60)
            if op == "-" and b > a:
                a, b = b, a
        if (a, op, b) not in seen:
            seen.add((a, op, b))
            break
    answer = {"+": a + b, "-": a - b, "*": a * b}[op]
    question = rng.choice(TEMPLATES[op]).format(a=a, b=b, name=rng.choice(NAMES))
    return {"prompt": question, "completion": f"{a} {op} {b} = {answer}\n#### {answer}", "answer": str(answer)}


def main() -> None:
    rng = random.Random(1234)
    seen: set = set()
    ops = ["+", "-", "*"]
    train = [problem(rng, ops[i % 3], seen) for i in range(300)]
    held_out = [problem(rng, ops[i % 3], seen) for i in range(60)]
    held_out_problems = {(r["prompt"], r["answer"]) for r in held_out}
    with open(HERE / "sft.jsonl", "w") as f:
        for row in train:
            f.write(json.dumps({"prompt": row["prompt"], "completion": row["completion"]}) + "\n")
    with open(HERE / "eval_prompts.jsonl", "w") as f:
        for row in held_out:
            f.write(json.dumps({"prompt": row["prompt"], "answer": row["answer"]}) + "\n")
    pref_rng = random.Random(99)
    with open(HERE / "prefs.jsonl", "w") as f:
        for i in range(150):
            row = problem(pref_rng, ops[i % 3], seen)
            f.write(json.dumps(preference(pref_rng, row, wrong_number=i % 2 == 0)) + "\n")
    write_rl_prompts(held_out)
    write_heldout_arithmetic(held_out)


def operand_key(row: dict) -> tuple:
    return tuple(sorted(map(int, re.findall(r"\d+", row["prompt"])))) + (str(row["answer"]),)


def write_heldout_arithmetic(held_out: list[dict], count: int = 300) -> None:
    """A larger held-out set for RL: the 60 evaluation problems plus new sums and differences that share
    no operands with any training, preference or RL problem. (Almost every small product already occurs
    among the RL prompts, so the new problems are sums and differences; products come from the 60.)"""
    seen = {operand_key(r) for r in held_out}
    for name in ("sft.jsonl", "prefs.jsonl", "rl_prompts.jsonl"):
        for line in (HERE / name).open():
            row = json.loads(line)
            answer = row.get("answer") or re.search(r"#### (-?\d+)", row.get("completion") or row["chosen"]).group(1)
            seen.add(operand_key({"prompt": row["prompt"], "answer": answer}))
    rows = [{"prompt": r["prompt"], "answer": r["answer"]} for r in held_out]
    rng, ops = random.Random(4242), ["+", "-"]
    while len(rows) < count:
        row = problem(rng, ops[len(rows) % 2], set())
        if operand_key(row) not in seen:
            seen.add(operand_key(row))
            rows.append({"prompt": row["prompt"], "answer": row["answer"]})
    with open(HERE / "heldout_arithmetic.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_rl_prompts(held_out: list[dict], count: int = 1200) -> None:
    """Questions and answers only (no worked solutions), for PPO. There are too few small products for
    unique operands, so a problem may recur in another wording; none shares its operands with held-out
    evaluation problems."""
    held = {tuple(sorted(map(int, re.findall(r"\d+", r["prompt"])))) + (r["answer"],) for r in held_out}
    rng, ops, rows = random.Random(7), ["+", "-", "*"], []
    while len(rows) < count:
        row = problem(rng, ops[len(rows) % 3], set())
        if tuple(sorted(map(int, re.findall(r"\d+", row["prompt"])))) + (row["answer"],) not in held:
            rows.append({"prompt": row["prompt"], "answer": row["answer"]})
    with open(HERE / "rl_prompts.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def preference(rng: random.Random, row: dict, wrong_number: bool) -> dict:
    """The demonstration is chosen; rejected is a near-miss number in the same format, or the right number
    without the `####` line."""
    answer = int(row["answer"])
    if wrong_number:
        wrong = answer + rng.choice([-10, -2, -1, 1, 2, 10])
        work = row["completion"].split("\n")[0].rsplit("=", 1)[0]
        rejected = f"{work}= {wrong}\n#### {wrong}"
    else:
        rejected = rng.choice(["The answer is {n}.", "It is {n}.", "{n}", "I think it's {n}."]).format(n=answer)
    return {"prompt": row["prompt"], "chosen": row["completion"], "rejected": rejected}


if __name__ == "__main__":
    main()
