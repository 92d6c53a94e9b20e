"""The GPU check: every stage of align on one CUDA device in a few minutes, with TRL + PEFT on the same work.

    python benchmarks/gpu_check.py [--out DIR] [--budget SECONDS] [--sections a,b] [--no-trl] [--dry-run]

Why it is built this way:
- align had never run on a GPU, and a lent GPU comes for about 15 minutes, on a machine with no registry
  access. So the check builds its models from configs with random weights (a SmolLM2-135M shape and a
  Llama-3.2-1B shape) and a tokenizer trained offline (`align.models.tiny`): nothing is downloaded.
- Every stage runs through its own code as `make bench` drives it (`benchmarks.bench.<stage>.run`: the stage's
  model, data, trainer and PPO loop) at the precision `align.runtime.precision` resolves for the device; TRL + PEFT
  run the same work where TRL is importable. Everything runs in this one process, so imports and CUDA
  start-up are paid once; GPU peak memory is reset before each side, so each side's peak is its own.
- Each section is guarded: a failure is recorded with the tail of its traceback and the rest still run. A
  global budget skips what no longer fits, an alarm stops a section that overruns, and the JSON and Markdown
  are rewritten after every section, so a run killed from outside still leaves what it measured.
- `--dry-run`: the tiny model on the CPU, two steps a stage (one PPO step), no TRL comparison, no QLoRA where
  bitsandbytes cannot run. The test suite runs it, so the script cannot rot while no GPU is lent.

Writes gpu_check.json, gpu_check.md and gpu_check.log (library output) to --out (default $OUT when set,
else ./gpu_check). `scripts/gpu_wheels.sh` gathers the wheels the GPU machine lacks and prints the command.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import logging
import math
import os
import platform
import signal
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the GPU machine runs the checkout as it is, align not installed
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.bench.table import fmt  # noqa: E402
from benchmarks.bench.workload import StageWork, Workload  # noqa: E402

QUICKSTART = ROOT / "data" / "quickstart"
# Model shapes (random weights). small: SmolLM2-135M; large: Llama-3.2-1B; tiny: the dry run's (both roles).
SHAPES = {
    "small": {"hidden": 576, "intermediate": 1536, "layers": 30, "heads": 9, "kv_heads": 3, "vocab": 49152,
              "positions": 2048, "name": "SmolLM2-135M shape"},
    "large": {"hidden": 2048, "intermediate": 8192, "layers": 16, "heads": 32, "kv_heads": 8, "vocab": 128256,
              "positions": 2048, "name": "Llama-3.2-1B shape"},
    "tiny": {"hidden": 64, "intermediate": 128, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": None,
             "positions": 512, "name": "tiny (dry run)"},
}
# HBM bandwidth by datasheet (bytes/s), for the decoding bound; the env section measures a copy as well.
GPU_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12, "A10": 0.6e12, "L4": 0.3e12,
                 "RTX 4090": 1.008e12}
# Per (stage, model role): steps, batch, max length, learning rate (high: the weights are random), data.
SIZES = {
    "gpu": {("sft", "small"): dict(steps=8, batch_size=8, max_length=256, lr=1e-3, data="quickstart"),
            ("reward", "small"): dict(steps=8, batch_size=8, max_length=256, lr=1e-3, data="quickstart"),
            ("dpo", "small"): dict(steps=8, batch_size=8, max_length=256, lr=5e-4, data="quickstart"),
            ("ppo", "small"): dict(steps=3, batch_size=32, max_length=256, lr=1e-4, data="quickstart",
                                   prompts_per_step=8, samples_per_prompt=4, max_new_tokens=64),
            ("sft", "large"): dict(steps=6, batch_size=16, max_length=1024, lr=1e-3, data="long"),
            ("dpo", "large"): dict(steps=5, batch_size=8, max_length=1024, lr=5e-4, data="long")},
    "dry": {("sft", "small"): dict(steps=2, batch_size=2, max_length=128, lr=1e-3, data="quickstart"),
            ("reward", "small"): dict(steps=2, batch_size=2, max_length=128, lr=1e-3, data="quickstart"),
            ("dpo", "small"): dict(steps=2, batch_size=2, max_length=128, lr=1e-3, data="quickstart"),
            ("ppo", "small"): dict(steps=1, batch_size=4, max_length=96, lr=1e-4, data="quickstart",
                                   prompts_per_step=2, samples_per_prompt=2, max_new_tokens=8),
            ("sft", "large"): dict(steps=2, batch_size=2, max_length=96, lr=1e-3, data="long"),
            ("dpo", "large"): dict(steps=2, batch_size=2, max_length=96, lr=1e-3, data="long")},
}
DECODE = {"gpu": {"prompts": 16, "samples": 4, "max_new_tokens": 128},
          "dry": {"prompts": 2, "samples": 2, "max_new_tokens": 8}}
DEFAULT_BUDGET = {"gpu": 450.0, "dry": 240.0}
SECTION_CAP = {"gpu": 150.0, "dry": 120.0}  # the alarm for one section
MIN_START = {"gpu": 15.0, "dry": 2.0}  # a section starts only with this much budget left
# Issue 28's targets: (name, section, how to read the value, threshold, "min" or "max").
TARGETS = [
    ("LoRA SFT tokens/s vs TRL at the 1B shape", "sft_lora_1b", "speed", 2.0, "min"),
    ("QLoRA SFT tokens/s vs TRL at the 1B shape", "sft_qlora_1b", "speed", 2.0, "min"),
    ("LoRA SFT MFU at the 1B shape", "sft_lora_1b", "mfu", 0.40, "min"),
    ("QLoRA SFT MFU at the 1B shape", "sft_qlora_1b", "mfu", 0.40, "min"),
    ("DPO step speed vs TRL DPOTrainer (1B shape)", "dpo_1b", "speed", 1.9, "min"),
    ("DPO peak allocated memory vs TRL (1B shape)", "dpo_1b", "memory", 0.5, "max"),
    ("rollout decoding vs plain generate (1B bf16, varied lengths)", "decode_1b", "decode_speedup", 4.0, "min"),
    ("rollout decoding share of the HBM-bandwidth bound (batch 64)", "decode_1b", "bound_share", 0.30, "min"),
]

log = logging.getLogger("gpu_check")


# ------------------------------------------------------------------------------------------ the run's state


@dataclass
class Check:
    """One run: options, folders, what earlier sections built, and the report being written."""

    out: Path
    tmp: Path
    dry: bool
    budget: float
    trl: bool  # compare with TRL + PEFT
    console: object = field(default=sys.stdout)
    log_file: object = None
    started: float = field(default_factory=time.monotonic)
    models: dict = field(default_factory=dict)   # role -> facts (path, parameters, bytes)
    data: dict = field(default_factory=dict)     # (kind, stage) -> path
    facts: dict = field(default_factory=dict)    # what the machine can run: trl, bnb, liger, cuda
    report: dict = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return "dry" if self.dry else "gpu"

    def remaining(self) -> float:
        return self.budget - (time.monotonic() - self.started)

    def say(self, text: str) -> None:
        print(text, file=self.console, flush=True)


@dataclass
class Section:
    name: str
    run: object  # callable(Check) -> dict
    needs: tuple[str, ...] = ()
    about: str = ""


class SectionTimeout(Exception):
    pass


# ------------------------------------------------------------------------------------------ guards


@contextlib.contextmanager
def alarm(seconds: float):
    """Raise `SectionTimeout` in this section after `seconds` (main thread only, where signals arrive)."""
    usable = hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
    if not usable or seconds <= 0:
        yield
        return

    def fire(signum, frame):
        raise SectionTimeout(f"stopped after {seconds:.0f} s (section cap or global budget)")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def quiet(c: Check):
    """Library output (progress bars, warnings) goes to the log file, so the console shows the check."""
    if c.log_file is None:
        yield
        return
    with contextlib.redirect_stdout(c.log_file), contextlib.redirect_stderr(c.log_file):
        yield


def fresh_gpu() -> float | None:
    """Free what earlier work left and reset the peak counters: each side's peak is then its own. Returns the
    memory still allocated (MB), which shows a leak from an earlier section."""
    gc.collect()
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return round(torch.cuda.memory_allocated() / 2**20, 1)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def error_record(err: BaseException) -> dict:
    """The error and the tail of its traceback, as text (the exception and its frames are let go)."""
    lines = traceback.format_exception(type(err), err, err.__traceback__)
    return {"error": f"{type(err).__name__}: {err}"[:500], "traceback": "".join(lines)[-3000:]}


def unmet(c: Check, needs: tuple[str, ...]) -> str | None:
    """Why a section cannot run here (a missing package or device), or None."""
    for need in needs:
        problem = c.facts.get(f"{need}_problem")
        if problem:
            return problem
    return None


def run_section(c: Check, section: Section) -> dict:
    """Run one section under its guards and record it; never raises."""
    started = time.monotonic()
    record: dict = {"about": section.about}
    why = unmet(c, section.needs)
    if why is None and c.remaining() < MIN_START[c.mode]:
        why = f"global budget of {c.budget:.0f} s spent"
    if why is not None:
        record.update(status="skipped", note=why)
    else:
        try:
            with alarm(min(SECTION_CAP[c.mode], c.remaining())), quiet(c):
                result = section.run(c)
            record.update(result)
            record["status"] = "failed" if result.get("error") else "ok"
        except Exception as err:  # noqa: BLE001 - recorded; the other sections still run
            record.update(status="failed", **error_record(err))
            log.error("section %s failed:\n%s", section.name, record["traceback"])
        finally:
            fresh_gpu()
    record["seconds"] = round(time.monotonic() - started, 1)
    c.report["sections"][section.name] = record
    write_report(c)
    c.say(status_line(c, section.name, record))
    return record


def status_line(c: Check, name: str, record: dict) -> str:
    """`[ 12.3s] sft_lora: ok in 4.1 s`, with the reason of a failure or skip, or the checks that failed."""
    why = record.get("note") or record.get("error") if record["status"] != "ok" else None
    failed = [k for k, v in (record.get("checks") or {}).items() if v is False]
    detail = f" ({why})" if why else (f" (checks failed: {', '.join(failed)})" if failed else "")
    return f"[{c.budget - c.remaining():6.1f}s] {name}: {record['status']}{detail} in {record['seconds']} s"


# ------------------------------------------------------------------------------------------ env


def package_versions() -> dict:
    from importlib import metadata

    names = ["torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "liger-kernel",
             "triton", "pydantic", "pydantic-core", "tokenizers", "safetensors", "huggingface-hub", "numpy",
             "pyarrow", "fsspec", "typing-extensions", "dill", "multiprocess"]
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def import_problem(module: str) -> str | None:
    try:
        importlib.import_module(module)
        return None
    except Exception as err:  # noqa: BLE001 - any import failure means the package cannot be used here
        return f"{module} cannot be imported ({type(err).__name__}: {str(err)[:200]})"


def bnb_problem() -> str | None:
    """Why 4-bit layers cannot run here: align's own check, then (on a GPU, where that only imports
    bitsandbytes) one quantize/dequantize round trip through its CUDA library."""
    from align.models.loading import four_bit_problem

    problem = four_bit_problem()
    if problem or not torch.cuda.is_available():
        return problem
    try:
        import bitsandbytes.functional as F

        packed, state = F.quantize_4bit(torch.randn(64, 64, device="cuda", dtype=torch.bfloat16), quant_type="nf4")
        F.dequantize_4bit(packed, state)
        return None
    except Exception as err:  # noqa: BLE001 - no usable CUDA library in the wheel, for one
        return f"bitsandbytes 4-bit on CUDA failed ({type(err).__name__}: {str(err)[:200]})"


def machine_facts(c: Check) -> dict:
    """What this machine can run; sections that need a missing piece are skipped with its reason."""
    cuda = torch.cuda.is_available()
    facts = {"cuda_problem": None if cuda else "no CUDA device",
             "trl_problem": import_problem("trl"),
             "bnb_problem": bnb_problem(),
             "liger_problem": import_problem("liger_kernel.transformers")}
    if not cuda and not facts["liger_problem"]:
        facts["liger_problem"] = "Liger's Triton kernels need a GPU"
    c.facts.update(facts)
    c.trl = c.trl and facts["trl_problem"] is None
    return facts


def gpu_facts() -> dict:
    """The device by name, with its datasheet peaks and those measured here (a copy and a bf16 matmul)."""
    from benchmarks.bench.measure import GPU_PEAK_BF16

    if not torch.cuda.is_available():
        return {"gpu": None}
    props = torch.cuda.get_device_properties(0)
    name = torch.cuda.get_device_name()
    return {"gpu": name, "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda, "peak_bf16_flops": peak_of(GPU_PEAK_BF16, name),
            "bandwidth_bytes_per_s": peak_of(GPU_BANDWIDTH, name),
            "measured_copy_bytes_per_s": measured(measured_copy),
            "measured_bf16_matmul_flops": measured(measured_matmul),
            "flash_sdp": torch.backends.cuda.flash_sdp_enabled()}


def measured(fn) -> float | None:
    """A ceiling measured here, or None if measuring failed (the datasheet figure still serves)."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - a figure for the report, not a check
        log.warning("measuring %s failed: %s", fn.__name__, err)
        return None


def peak_of(table: dict, name: str | None):
    return next((v for k, v in table.items() if name and k in name), None)


def cuda_seconds(fn, repeats: int) -> float:
    """Median seconds of `fn` on the device, timed with CUDA events after a warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


def measured_copy() -> float:
    """Device-to-device copy bandwidth, bytes read plus written per second (1 GiB buffers)."""
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    seconds = cuda_seconds(lambda: b.copy_(a), 10)
    del a, b
    return round(2 * 2**30 / seconds, -9)


def measured_matmul(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    seconds = cuda_seconds(lambda: a @ b, 10)
    del a, b
    return round(2 * n**3 / seconds, -11)


def resolved_precision() -> dict:
    """What `align.runtime.precision` chooses on this device, per training method."""
    from align.runtime.precision import device_facts, resolve

    return {"device": device_facts().describe(),
            **{method: resolve(method=method).describe() for method in ("lora", "qlora", "full")}}


def env(c: Check) -> dict:
    facts = machine_facts(c)
    return {"python": platform.python_version(), "versions": package_versions(), **gpu_facts(),
            "precision": resolved_precision(), "torch_threads": torch.get_num_threads(), "trl_comparison": c.trl,
            "can_run": {k.removesuffix("_problem"): v is None for k, v in facts.items()},
            "problems": {k.removesuffix("_problem"): v for k, v in facts.items() if v}}


# ------------------------------------------------------------------------------------------ models and data


def shaped_model(tokenizer, shape: dict, device: str, dtype: torch.dtype, seed: int = 0):
    """A Llama of `shape` with random weights, built on `device` (fast on a GPU) in `dtype`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape["vocab"] or len(tokenizer), hidden_size=shape["hidden"],
                         intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                         max_position_embeddings=shape["positions"], bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.to(dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def model_facts(model, shape: dict, path: Path) -> dict:
    """Parameter counts and bytes: the FLOPs of a token (matmul weights) and the bytes a decoding step reads."""
    config = model.config
    params = sum(p.numel() for p in model.parameters())  # a tied head is counted once
    embedding = model.get_input_embeddings().weight.numel()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    head_dim = config.hidden_size // config.num_attention_heads
    return {"path": str(path), "shape": shape["name"], "parameters": params,
            "matmul_parameters": params if tied else params - embedding,  # the lookup costs no FLOPs
            "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "layers": config.num_hidden_layers, "hidden": config.hidden_size, "vocab": config.vocab_size,
            # K and V of one token in every layer, at 2 bytes (bf16 cache)
            "kv_bytes_per_token": 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 2}


def build_model(c: Check, role: str, tokenizer) -> dict:
    shape = SHAPES["tiny" if c.dry else role]
    device = "cuda" if torch.cuda.is_available() and not c.dry else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    folder = c.tmp / f"model-{role}"
    started = time.monotonic()
    model = shaped_model(tokenizer, shape, device, dtype)
    if device == "cuda":
        warm_up(model)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    facts = model_facts(model, shape, folder)
    facts["build_seconds"] = round(time.monotonic() - started, 1)
    del model
    return facts


def warm_up(model, rows: int = 4, length: int = 256) -> None:
    """One forward and backward pass, so CUDA's lazy set-up (kernels, cuBLAS and SDPA handles) is paid here
    and not by whichever side of the first comparison runs first."""
    ids = torch.randint(0, model.config.vocab_size, (rows, length), device=model.device)
    model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    sync()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def worked_lines(rng, count: int) -> tuple[str, str]:
    """`count` arithmetic questions and their worked answers (text in the quickstart's format)."""
    pairs = [(rng.randint(1, 99), rng.randint(1, 99)) for _ in range(count)]
    question = " ".join(f"What is {a} + {b}?" for a, b in pairs)
    answer = "\n".join(f"{a} + {b} = {a + b}" for a, b in pairs) + f"\n#### {sum(a + b for a, b in pairs)}"
    return question, answer


def tokens_per_line(tokenizer, rng) -> float:
    """About how many tokens one worked line makes, question and answer together."""
    question, answer = worked_lines(rng, 8)
    return len(tokenizer(question + answer, add_special_tokens=False)["input_ids"]) / 8


def long_data(c: Check, tokenizer, max_length: int, rows: int = 256) -> dict:
    """SFT rows and preference pairs (prompt and one response) of 40-85% of `max_length` tokens, for
    throughput at realistic lengths; a rejected response differs from its chosen one in the final answer."""
    import random

    rng = random.Random(0)
    per_line = tokens_per_line(tokenizer, rng)

    def lines() -> int:
        return max(1, int(max_length * rng.uniform(0.4, 0.85) / per_line))

    sft, pairs = [], []
    for _ in range(rows):
        question, answer = worked_lines(rng, lines())
        sft.append({"prompt": question, "completion": answer})
        question, answer = worked_lines(rng, lines())
        wrong = answer.rsplit("#### ", 1)[0] + "#### 0"
        pairs.append({"prompt": question, "chosen": answer, "rejected": wrong})
    folder = c.tmp / "data"
    return {("long", "sft"): str(write_jsonl(folder / "long_sft.jsonl", sft)),
            ("long", "dpo"): str(write_jsonl(folder / "long_prefs.jsonl", pairs))}


def models(c: Check) -> dict:
    """Both models (the tiny one twice in a dry run) and the data every section trains on."""
    from align.models.tiny import make_tokenizer

    tokenizer = make_tokenizer("chatml")
    for role in ("small", "large"):
        c.models[role] = build_model(c, role, tokenizer)
        fresh_gpu()
    c.data.update({("quickstart", "sft"): str(QUICKSTART / "sft.jsonl"),
                   ("quickstart", "reward"): str(QUICKSTART / "prefs.jsonl"),
                   ("quickstart", "dpo"): str(QUICKSTART / "prefs.jsonl"),
                   ("quickstart", "ppo"): str(QUICKSTART / "rl_prompts.jsonl")})
    c.data.update(long_data(c, tokenizer, SIZES[c.mode][("sft", "large")]["max_length"]))
    return {"models": c.models, "tokenizer_vocab": len(tokenizer),
            "note": "random weights; the tokenizer uses the first ids of the vocabulary, the model's full vocabulary "
                    "is computed in every LM-head pass"}


# ------------------------------------------------------------------------------------------ training sections


def workload(c: Check, stage: str, role: str, settings: dict | None = None, liger: bool = False) -> Workload:
    size = dict(SIZES[c.mode][(stage, role)])
    data = c.data[(size.pop("data"), stage)]
    return Workload(model=c.models[role]["path"], registry=str(c.tmp / "registry"), tiny=c.dry,
                    settings=dict(settings or {}), liger=liger, stages={stage: StageWork(stage, data, **size)})


def side_names(c: Check, extra: tuple[str, ...] = ()) -> list[str]:
    """align first (the checks), then TRL where it is compared, then any align variants."""
    return ["align"] + (["trl"] if c.trl else []) + list(extra)


def run_side(c: Check, stage: str, side: str, work: Workload) -> dict:
    """One side through `benchmarks.bench.<stage>.run`, in its own temp folder; an error is recorded, not raised."""
    import dataclasses

    runner = importlib.import_module(f"benchmarks.bench.{stage}")
    base, variant = side.split(":", 1) if ":" in side else (side, None)
    if variant == "one_pass":  # the stage with one forward/backward pass a batch (no max_pass_tokens split)
        work = dataclasses.replace(work, settings={**work.settings, "max_pass_tokens": None})
    leftover = fresh_gpu()
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix=f"{stage}-{side.replace(':', '-')}-", dir=c.tmp) as folder:
            result = runner.run(base, work, work.stages[stage], Path(folder))
    except Exception as err:  # noqa: BLE001 - one side failing (or the alarm) leaves the other sides' figures
        log.error("%s/%s failed:\n%s", stage, side, error_record(err)["traceback"])
        result = {**error_record(err), "timed_out": isinstance(err, SectionTimeout)}
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    result["allocated_before_mb"] = leftover
    return result


def train_flops_per_token(facts: dict, method: str) -> float:
    """Model FLOPs of one trained token: forward 2N, backward 4N with weight gradients (full) or 2N without
    them (LoRA/QLoRA: activation gradients only; the adapters' own are negligible). Attention scores excluded."""
    return (6 if method == "full" else 4) * facts["matmul_parameters"]


def mfu(c: Check, role: str, method: str, tokens_per_second) -> float | None:
    peak = c.report["sections"].get("env", {}).get("peak_bf16_flops")
    if not peak or not tokens_per_second:
        return None
    return round(train_flops_per_token(c.models[role], method) * tokens_per_second / peak, 4)


def loss_checks(result: dict, expect_fall: bool = True) -> dict:
    """Losses finite, and (two steps or more) lower over the second half of the steps than over the first:
    each step sees other rows, so one step against another is noisier than half against half."""
    losses = [x for x in (result.get("step_losses") or []) if x is not None]
    finite = bool(losses) and all(math.isfinite(x) for x in losses)
    half = len(losses) // 2
    falls = (mean(losses[-half:]) < mean(losses[:half])) if expect_fall and finite and half else None
    return {"losses_finite": finite, "loss_falls": falls}


def vs_trl(sides: dict) -> dict | None:
    """align against TRL on the same work: speed (x faster) and peak allocated memory (x of TRL's)."""
    ours, theirs = sides.get("align") or {}, sides.get("trl") or {}
    if not ours or not theirs or "error" in ours or "error" in theirs:
        return None
    out = {}
    if ours.get("tokens_per_second") and theirs.get("tokens_per_second"):
        out["speed"] = round(ours["tokens_per_second"] / theirs["tokens_per_second"], 3)
    elif ours.get("seconds_per_step") and theirs.get("seconds_per_step"):
        out["speed"] = round(theirs["seconds_per_step"] / ours["seconds_per_step"], 3)
    if ours.get("rollout_tokens_per_second") and theirs.get("rollout_tokens_per_second"):
        out["rollout_speed"] = round(ours["rollout_tokens_per_second"] / theirs["rollout_tokens_per_second"], 3)
    if ours.get("peak_gpu_allocated_mb") and theirs.get("peak_gpu_allocated_mb"):
        out["memory"] = round(ours["peak_gpu_allocated_mb"] / theirs["peak_gpu_allocated_mb"], 3)
    return out


def bench_pair(c: Check, stage: str, role: str, settings: dict | None = None, liger: bool = False,
               extra_sides: tuple[str, ...] = ()) -> dict:
    """One stage's work on each side; checks on align's side, ratios against TRL's."""
    work = workload(c, stage, role, settings, liger)
    method = work.settings.get("method", "lora")
    sides = {}
    for side in side_names(c, extra_sides):
        sides[side] = run_side(c, stage, side, work)
        if sides[side].get("timed_out"):
            break  # the section's alarm has fired: no time for the other sides
        if "error" not in sides[side] and stage != "ppo":
            sides[side]["mfu"] = mfu(c, role, method, sides[side].get("tokens_per_second"))
    align_side = sides["align"]
    record = {"model": role, "stage": stage, "method": method, "sides": sides, "vs_trl": vs_trl(sides),
              "checks": {} if "error" in align_side else loss_checks(align_side, expect_fall=stage != "ppo")}
    if stage != "ppo" and "error" not in align_side:
        record["mfu"] = align_side.get("mfu")
    if "error" in align_side:
        record["error"] = f"align side: {align_side['error']}"
    return record


def sft_lora(c: Check) -> dict:
    return bench_pair(c, "sft", "small", {"method": "lora"})


def sft_qlora(c: Check) -> dict:
    return bench_pair(c, "sft", "small", {"method": "qlora"})


def sft_full(c: Check) -> dict:
    return bench_pair(c, "sft", "small", {"method": "full", "lr": 1e-4 if not c.dry else 1e-3})


def reward(c: Check) -> dict:
    return bench_pair(c, "reward", "small")


def dpo(c: Check) -> dict:
    return bench_pair(c, "dpo", "small")


def ppo(c: Check) -> dict:
    """GRPO (critic-free) through `align.rl.ppo.PPOTrainer`; a policy-gradient loss need not fall, so the
    checks are finite figures (loss, KL, gradient norm) on every step."""
    record = bench_pair(c, "ppo", "small")
    steps = (record["sides"]["align"].get("step_figures") or [])
    figures = [v for s in steps for k, v in s.items() if k in ("policy_loss", "kl_per_token", "grad_norm")]
    record["checks"]["figures_finite"] = bool(steps) and all(v is not None and math.isfinite(v) for v in figures)
    record["eos_rate"] = [s.get("eos_rate") for s in steps]
    return record


def sft_lora_1b(c: Check) -> dict:
    return bench_pair(c, "sft", "large", {"method": "lora"}, extra_sides=("align:one_pass",))


def sft_qlora_1b(c: Check) -> dict:
    return bench_pair(c, "sft", "large", {"method": "qlora"})


def dpo_1b(c: Check) -> dict:
    return bench_pair(c, "dpo", "large", extra_sides=("align:one_pass",))


def liger_sft_1b(c: Check) -> dict:
    """Liger's RMSNorm, SwiGLU and RoPE kernels patched into transformers' Llama for both sides (TRL also
    with its own `use_liger_kernel`: the fused linear cross-entropy); compared with `sft_lora_1b`, which ran
    without. Last in the order: the patch stays for the rest of the process."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False)
    record = bench_pair(c, "sft", "large", {"method": "lora"}, liger=True)
    plain = c.report["sections"].get("sft_lora_1b", {}).get("sides", {})
    record["liger_vs_plain"] = {side: ratio(r.get("tokens_per_second"),
                                            (plain.get(side) or {}).get("tokens_per_second"))
                                for side, r in record["sides"].items()}
    return record


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def ratio(a, b) -> float | None:
    return round(a / b, 3) if a and b else None


# ------------------------------------------------------------------------------------------ merge and rollouts


def qlora_merge(c: Check) -> dict:
    """A QLoRA SFT entry registered by the stage itself (`align.stages.sft.SFT`), then merged into its
    parent's fp32 weights (`align.export.merge.merge_entry`) with the parity `align.export.parity` states for fp32."""
    from benchmarks.bench.common import stage_context
    from align.export.merge import merge_entry
    from align.stages import sft

    work = workload(c, "sft", "small", {"method": "qlora"})
    folder = c.tmp / "qlora-merge"
    ctx = stage_context(work, work.stages["sft"], folder)
    entry = sft.SFT(ctx).run()
    fresh_gpu()
    merged = merge_entry(entry, ctx.registry, "fp32")
    losses = [h["loss"] for h in entry.manifest.get("history", []) if "loss" in h]
    adapter = entry.manifest.get("adapter") or {}
    checks = {**loss_checks({"step_losses": losses}), "parity_passed": bool(merged.parity.get("passed")),
              "trained_as_qlora": adapter.get("method") == "qlora" and bool(adapter.get("quant")),
              "merged_in_fp32": str(next(merged.model.parameters()).dtype) == "torch.float32"}
    return {"entry": entry.ref, "adapter": adapter, "step_losses": losses, "parity": merged.parity, "checks": checks,
            "peak_gpu_allocated_mb": (entry.manifest.get("timings") or {}).get("peak_gpu_allocated_mb")}


def load_for_decoding(c: Check, role: str):
    """A role's model and tokenizer as the rollouts hold them: weights at the resolved width, marked."""
    from align.models.loading import load_causal_lm, load_tokenizer, resolve_model_ref
    from align.runtime.precision import mark, resolve
    from align.registry.store import Registry

    registry = Registry(c.tmp / "registry")
    source = resolve_model_ref(c.models[role]["path"], registry, check_hub=False)
    precision = resolve()
    model = load_causal_lm(source, registry, dtype=precision.weights)
    model = mark(model.to("cuda" if torch.cuda.is_available() else "cpu"), precision)
    return model.eval(), load_tokenizer(source, registry), precision


def prompt_ids(tokenizer, prompts: int, samples: int) -> tuple[list[dict], list[list[int]]]:
    """The first quickstart RL prompts as chat prompts, each repeated `samples` times in a row."""
    from align.data.tokenize import encode_prompt

    rows = [json.loads(line) for line in (QUICKSTART / "rl_prompts.jsonl").open()][:prompts]
    ids = [encode_prompt(tokenizer, [{"role": "user", "content": r["prompt"]}]) for r in rows]
    return [r for r in rows for _ in range(samples)], [p for p in ids for _ in range(samples)]


@contextlib.contextmanager
def eos_logits(model, eos: int, rule):
    """Rewrite the LM head's EOS logit on every call: `rule(logits, call)` -> new EOS logits. Random weights
    almost never sample EOS, so the rollout checks set when responses end."""
    calls = {"n": 0}

    def hook(module, inputs, output):
        output[..., eos] = rule(output, calls["n"]).to(output.dtype)
        calls["n"] += 1
        return output

    handle = model.get_output_embeddings().register_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def cascade_rule(eos: int, start: int = 3):
    """From call `start` on, the first half of the rows still decoding end: rows leave at different steps."""
    def rule(logits, call):
        current = logits[..., eos].float()
        if call < start:
            return torch.full_like(current, -1e4)
        rows = logits.shape[0]
        forced = torch.arange(rows, device=logits.device) < max(1, math.ceil(rows / 2))
        shape = (rows,) + (1,) * (current.dim() - 1)
        return torch.where(forced.view(shape), torch.full_like(current, 1e4), torch.full_like(current, -1e4))
    return rule


def response_tokens(rollouts) -> list[list[int]]:
    from align.data.tokenize import IGNORE

    return [[t for t in row.tolist() if t != IGNORE] for row in rollouts.labels]


def rollout_eos(c: Check) -> dict:
    """Rollouts as PPO samples them (`align.rl.rollout.sample_rollouts`, our sampler) stop each response at
    its EOS: EOS last and once, rows ending at different steps, no decoding call after the last row ended."""
    from align.config.schema import GenerationSettings
    from align.rl.rollout import sample_rollouts

    model, tokenizer, _ = load_for_decoding(c, "small")
    eos = tokenizer.eos_token_id
    rows, ids = prompt_ids(tokenizer, 4, 2)
    settings = GenerationSettings(max_new_tokens=32, temperature=1.0)
    with eos_logits(model, eos, cascade_rule(eos)) as calls:
        rollouts = sample_rollouts(model, tokenizer, rows, ids, settings, batch_size=len(ids), group=2)
    responses = response_tokens(rollouts)
    lengths = [len(r) for r in responses]
    checks = {"all_ended": bool(rollouts.ended.all()),
              "eos_last_and_once": all(r and r[-1] == eos and r.count(eos) == 1 for r in responses),
              "rows_leave_at_different_steps": len(set(lengths)) > 1,
              "no_call_after_last_eos": calls["n"] == max(lengths),
              "texts_without_eos": all(tokenizer.eos_token not in t for t in rollouts.texts)}
    return {"lengths": lengths, "head_calls": calls["n"], "max_new_tokens": settings.max_new_tokens, "checks": checks}


def timed_decode(fn) -> tuple[list, float]:
    sync()
    started = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - started


def decode_variant(model, tokenizer, ids: list[list[int]], settings, group: int, rule) -> dict:
    """Plain `generate` (align.models.generation) against our sampler (align.rl.sampler) on the same prompts."""
    from align.models.generation import generate
    from align.runtime.precision import inference_autocast
    from align.rl.sampler import sample

    def ours():
        with inference_autocast(model):
            return sample(model, tokenizer, ids, settings, group)

    def plain():
        return generate(model, tokenizer, ids, settings, batch_size=len(ids), autocast=True)

    out = {}
    for name, fn in (("generate", plain), ("sampler", ours)):
        with torch.no_grad(), eos_logits(model, tokenizer.eos_token_id, rule):
            results, seconds = timed_decode(fn)
        tokens = sum(len(g.token_ids) for g in results)
        out[name] = {"seconds": round(seconds, 3), "tokens": tokens, "tokens_per_second": round(tokens / seconds, 1),
                     "ended_share": round(sum(g.ended_with_eos for g in results) / len(results), 3)}
    out["speedup"] = ratio(out["sampler"]["tokens_per_second"], out["generate"]["tokens_per_second"])
    return out


def no_eos_rule(eos: int):
    return lambda logits, call: torch.full_like(logits[..., eos].float(), -1e4)


def rate_rule(eos: int, rate: float):
    """EOS with probability `rate` at every step: lengths spread as RL rollouts' do."""
    def rule(logits, call):
        others = logits.float().logsumexp(dim=-1)
        return others + math.log(rate / (1 - rate))
    return rule


def decoding_bound(facts: dict, rows: int, context: float, bandwidth: float | None) -> dict:
    """Tokens/s if a decoding step only had to read the weights once (and, second figure, its KV cache)."""
    if not bandwidth:
        return {}
    weights = facts["parameter_bytes"]
    kv = rows * context * facts["kv_bytes_per_token"]
    return {"bytes_per_step_weights": weights, "bytes_per_step_kv": round(kv),
            "bound_tokens_per_second": round(rows * bandwidth / weights, 1),
            "bound_with_kv_tokens_per_second": round(rows * bandwidth / (weights + kv), 1)}


def decode_1b(c: Check) -> dict:
    """Decoding tokens/s at batch 64 on the 1B shape at the resolved width: fixed length (no EOS) against
    the bandwidth bound, and lengths spread like rollouts' (EOS at 1/64 a step at 128 new tokens), sampler
    against generate."""
    from align.config.schema import GenerationSettings

    size = DECODE[c.mode]
    model, tokenizer, precision = load_for_decoding(c, "large")
    eos = tokenizer.eos_token_id
    _, ids = prompt_ids(tokenizer, size["prompts"], size["samples"])
    settings = GenerationSettings(max_new_tokens=size["max_new_tokens"], temperature=1.0)
    warm = GenerationSettings(max_new_tokens=4, temperature=1.0)
    decode_variant(model, tokenizer, ids, warm, size["samples"], no_eos_rule(eos))  # kernels, cache, autotune
    fixed = decode_variant(model, tokenizer, ids, settings, size["samples"], no_eos_rule(eos))
    rate = 2 / settings.max_new_tokens  # responses of about half the longest allowed, on average (1/64 at 128)
    varied = decode_variant(model, tokenizer, ids, settings, size["samples"], rate_rule(eos, rate))
    context = sum(len(p) for p in ids) / len(ids) + settings.max_new_tokens / 2
    bandwidth = c.report["sections"].get("env", {}).get("bandwidth_bytes_per_s")
    bound = decoding_bound(c.models["large"], len(ids), context, bandwidth)
    if bound:
        fixed["bound_share"] = round(fixed["sampler"]["tokens_per_second"] / bound["bound_tokens_per_second"], 4)
        fixed["generate_bound_share"] = round(fixed["generate"]["tokens_per_second"]
                                              / bound["bound_tokens_per_second"], 4)
    return {"rows": len(ids), "weights": precision.weights, "sampling": precision.sampling,
            "max_new_tokens": settings.max_new_tokens, "fixed_length": fixed, "varied_length": varied, **bound,
            "decode_speedup": varied["speedup"], "bound_share": fixed.get("bound_share"),
            "checks": {"varied_rows_end_at_eos": varied["sampler"]["ended_share"] > 0}}


# ------------------------------------------------------------------------------------------ the sections

SECTIONS = [
    Section("env", env, about="device, versions, resolved precision, measured copy and matmul peaks"),
    Section("models", models, about="random-weight models from configs, tokenizer built offline, data"),
    Section("sft_lora", sft_lora, about="SFT LoRA, small model"),
    Section("sft_qlora", sft_qlora, ("bnb",), about="SFT QLoRA 4-bit, small model"),
    Section("sft_full", sft_full, about="SFT full fine-tuning, small model"),
    Section("reward", reward, about="reward model (LoRA), small model"),
    Section("dpo", dpo, about="DPO (LoRA, precomputed reference), small model"),
    Section("ppo", ppo, about="PPO loop with GRPO, math checker, small model"),
    Section("qlora_merge", qlora_merge, ("bnb",), about="QLoRA entry merged in fp32, parity checked"),
    Section("rollout_eos", rollout_eos, about="rollouts stop at EOS"),
    Section("decode_1b", decode_1b, about="decoding tokens/s vs generate and the bandwidth bound, 1B shape"),
    Section("sft_lora_1b", sft_lora_1b, about="SFT LoRA, 1B shape (MFU)"),
    Section("sft_qlora_1b", sft_qlora_1b, ("bnb",), about="SFT QLoRA, 1B shape (MFU)"),
    Section("dpo_1b", dpo_1b, about="DPO LoRA, 1B shape"),
    Section("liger_sft_1b", liger_sft_1b, ("liger", "cuda"), about="SFT LoRA, 1B shape, Liger kernels on"),
]


# ------------------------------------------------------------------------------------------ the report


def targets(c: Check) -> list[dict]:
    """Issue 28's targets against what was measured (None where the section did not measure it)."""
    out = []
    for name, section, key, threshold, kind in TARGETS:
        record = c.report["sections"].get(section) or {}
        value = (record.get("vs_trl") or {}).get(key) if key in ("speed", "memory") else record.get(key)
        met = None if value is None else (value >= threshold if kind == "min" else value <= threshold)
        out.append({"target": name, "section": section, "value": value,
                    "threshold": f"{'>=' if kind == 'min' else '<='} {threshold}", "met": met})
    return out


def failed_checks(c: Check) -> list[str]:
    return [f"{name}.{check}" for name, record in c.report["sections"].items()
            for check, ok in (record.get("checks") or {}).items() if ok is False]


def md_header(c: Check) -> list[str]:
    env_record = c.report["sections"].get("env", {})
    gpu = env_record.get("gpu") or "no GPU (CPU dry run)"
    versions = env_record.get("versions") or {}
    shown = ", ".join(f"{k} {v}" for k, v in versions.items() if v and k in (
        "torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "liger-kernel"))
    precision = (env_record.get("precision") or {}).get("lora", "?")
    return [f"# align GPU check: {gpu}", "",
            f"- mode: {'dry run (tiny model, CPU, figures are not targets)' if c.dry else 'GPU'}; "
            f"elapsed {c.report.get('elapsed_seconds')} s of a {c.budget:.0f} s budget",
            f"- device: {(env_record.get('precision') or {}).get('device', '?')}",
            f"- precision (LoRA): {precision}",
            f"- measured: copy {fmt((env_record.get('measured_copy_bytes_per_s') or 0) / 1e12 or None, 2)} TB/s, "
            f"bf16 matmul {fmt((env_record.get('measured_bf16_matmul_flops') or 0) / 1e12 or None, 0)} TFLOP/s "
            f"(MFU is against the datasheet {fmt((env_record.get('peak_bf16_flops') or 0) / 1e12 or None, 0)})",
            f"- TRL + PEFT on the same work: {'yes' if c.trl else 'no'}"
            + ("" if c.trl else f" ({c.facts.get('trl_problem') or ('dry run' if c.dry else '--no-trl')})"),
            f"- versions: {shown}", f"- Python {env_record.get('python', '?')}", ""]


def md_sections(c: Check) -> list[str]:
    lines = ["| section | status | seconds | checks | note |", "|---|---|---:|---|---|"]
    for name, record in c.report["sections"].items():
        checks = ", ".join(f"{k} {'✓' if v else ('✗' if v is False else '–')}"
                           for k, v in (record.get("checks") or {}).items())
        note = record.get("note") or record.get("error") or record.get("about", "")
        lines.append(f"| {name} | {record['status']} | {fmt(record.get('seconds'))} | {checks} | {note[:160]} |")
    return lines


def md_bench(c: Check) -> list[str]:
    lines = ["", "| section | side | steps | tokens/s | s/step | GPU alloc / reserved MB | MFU | loss first → last "
             "| vs TRL (speed, memory) |", "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for name, record in c.report["sections"].items():
        for side, r in (record.get("sides") or {}).items():
            if "error" in r:
                lines.append(f"| {name} | {side} | failed: {r['error'][:120]} |||||||")
                continue
            losses = [x for x in (r.get("step_losses") or []) if x is not None]
            loss = f"{losses[0]:.3f} → {losses[-1]:.3f}" if losses else "–"
            rel = record.get("vs_trl") if side == "align" else None
            versus = f"{fmt((rel or {}).get('speed'), 2)}x, {fmt((rel or {}).get('memory'), 2)}x" if rel else ""
            rate = r.get("tokens_per_second") or r.get("rollout_tokens_per_second")
            lines.append(f"| {name} | {side} | {fmt(r.get('steps'))} | {fmt(rate)} "
                         f"| {fmt(r.get('seconds_per_step'), 3)} | {fmt(r.get('peak_gpu_allocated_mb'), 0)} / "
                         f"{fmt(r.get('peak_gpu_reserved_mb'), 0)} | {fmt(r.get('mfu'), 3)} | {loss} | {versus} |")
    return lines


def md_decode(c: Check) -> list[str]:
    record = c.report["sections"].get("decode_1b") or {}
    if record.get("status") != "ok":
        return []
    lines = ["", f"Decoding, {record['rows']} rows, {record['max_new_tokens']} new tokens, weights {record['weights']} "
             f"(bound: {fmt(record.get('bound_tokens_per_second'))} tokens/s from the weights' bytes, "
             f"{fmt(record.get('bound_with_kv_tokens_per_second'))} with the KV cache):", "",
             "| lengths | generate tokens/s | sampler tokens/s | sampler vs generate | sampler share of bound |",
             "|---|---:|---:|---:|---:|"]
    for variant in ("fixed_length", "varied_length"):
        v = record[variant]
        lines.append(f"| {variant.replace('_', ' ')} | {fmt(v['generate']['tokens_per_second'])} | "
                     f"{fmt(v['sampler']['tokens_per_second'])} | {fmt(v['speedup'], 2)}x | "
                     f"{fmt(v.get('bound_share'), 3)} |")
    return lines


def md_targets(c: Check) -> list[str]:
    lines = ["", "| target | measured | threshold | met |", "|---|---:|---|---|"]
    for t in c.report.get("targets", []):
        met = "–" if t["met"] is None else ("yes" if t["met"] else "no")
        lines.append(f"| {t['target']} | {fmt(t['value'], 3)} | {t['threshold']} | {met} |")
    return lines


def markdown(c: Check) -> str:
    notes = ["", "MFU: model FLOPs (6N full, 4N LoRA/QLoRA, N = matmul weights, attention excluded) x tokens/s "
             "over the datasheet bf16 peak; tokens/s counts non-padding tokens over all steps of the same work on "
             "both sides (PPO: rollout tokens/s)."]
    failed = failed_checks(c)
    if failed:
        notes.append(f"Failed checks: {', '.join(failed)}")
    return "\n".join(md_header(c) + md_sections(c) + md_bench(c) + md_decode(c) + md_targets(c) + notes) + "\n"


def write_report(c: Check) -> None:
    """Both files, rewritten after every section (atomically: a kill leaves the last complete pair)."""
    c.report["elapsed_seconds"] = round(time.monotonic() - c.started, 1)
    c.report["targets"] = targets(c)
    c.report["failed_checks"] = failed_checks(c)
    c.out.mkdir(parents=True, exist_ok=True)
    for name, text in (("gpu_check.json", json.dumps(c.report, indent=2, default=str)), ("gpu_check.md", markdown(c))):
        tmp = c.out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, c.out / name)


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check", help="folder for the JSON and table")
    parser.add_argument("--budget", type=float, default=None, help="seconds for all sections (default 450; dry 240)")
    parser.add_argument("--sections", default=None, help="comma-separated subset (env and models always run)")
    parser.add_argument("--no-trl", action="store_true", help="skip the TRL + PEFT side")
    parser.add_argument("--trl", action="store_true", help="run the TRL + PEFT side in a dry run too")
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU, 2 steps a stage, no TRL")
    parser.add_argument("--list", action="store_true", help="list the sections and exit")
    return parser.parse_args(argv)


def chosen_sections(names: str | None) -> list[Section]:
    if not names:
        return list(SECTIONS)
    wanted = {"env", "models", *(n.strip() for n in names.split(",") if n.strip())}
    unknown = wanted - {s.name for s in SECTIONS}
    if unknown:
        raise SystemExit(f"unknown section(s) {', '.join(sorted(unknown))}; see --list")
    return [s for s in SECTIONS if s.name in wanted]


def new_check(args: argparse.Namespace, tmp: Path, log_file=None, console=None) -> Check:
    """The run's state (a report with no sections yet)."""
    dry = args.dry_run
    budget = args.budget or DEFAULT_BUDGET["dry" if dry else "gpu"]
    c = Check(out=Path(args.out), tmp=tmp, dry=dry, budget=budget, trl=(args.trl or not dry) and not args.no_trl,
              console=console or sys.stdout, log_file=log_file)
    c.report = {"mode": "dry-run" if dry else "gpu", "command": sys.argv, "budget_seconds": budget,
                "started_at": time.strftime("%Y-%m-%d %H:%M:%S"), "sections": {}}
    return c


@contextlib.contextmanager
def dry_run_device(dry: bool):
    """A dry run hides the GPU (before CUDA starts), so it is the same CPU run on any machine, and uses one
    thread: tiny models gain nothing from more, and on a busy small CPU contention slows them many times.
    Both are put back afterwards (the test suite runs the dry run in its own process)."""
    if not dry:
        yield
        return
    visible, threads = os.environ.get("CUDA_VISIBLE_DEVICES"), torch.get_num_threads()
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if visible is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible


@contextlib.contextmanager
def logging_to(log_file):
    """Library and align logs (INFO and up) into the log file, for this run only."""
    handler = logging.StreamHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for s in SECTIONS:
            print(f"{s.name:14s} {s.about}" + (f" (needs {', '.join(s.needs)})" if s.needs else ""))
        return 0
    sections = chosen_sections(args.sections)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (dry_run_device(args.dry_run), tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp,
          (out / "gpu_check.log").open("w") as log_file, logging_to(log_file)):
        c = new_check(args, Path(tmp), log_file)
        c.say(f"gpu_check: {len(sections)} sections, budget {c.budget:.0f} s, out {out}")
        for section in sections:
            run_section(c, section)
        write_report(c)
    c.say(markdown(c))
    failed = [n for n, r in c.report["sections"].items() if r["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
