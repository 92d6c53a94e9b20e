"""Precision chosen from the machine at hand: the one place that decides weights dtype, autocast, loss
scaling, the RL sampling copy's dtype and the dtype of every no-grad pass.

Why one place: bf16 matmuls are about 2x faster than fp32 on a CPU with AVX512-BF16 or AMX and 10-20x
slower on one without (PyTorch falls back to a reference gemm there); a T4 or V100 multiplies fp16 on its
tensor cores but has no bf16. A recipe says `auto` and runs right on either; a stage, the sampling copy and
the scoring passes ask `resolve`/`inference_dtype` instead of testing the hardware themselves.

The hardware is read through one seam, `device_facts` (overridden by `simulate` in tests), so every rule
here can be checked for a CPU with and without native bf16 and a GPU with and without bf16 on any machine.
"""

from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

from align.runtime.cpu_probe import bf16_speedup, matmul_probe  # noqa: F401 - the probes the rules read

LOW_PRECISION = ("bf16", "fp16")


@dataclass(frozen=True)
class Device:
    """What a compute device multiplies natively. `kind`: cpu, cuda or mps."""

    kind: str
    name: str
    bf16: bool
    fp16: bool
    threads: int = 1
    features: str = ""  # the evidence, for messages: "avx512_bf16, amx_bf16", "compute capability 7.5"

    def describe(self) -> str:
        native = [d for d, ok in (("bf16", self.bf16), ("fp16", self.fp16)) if ok]
        what = f"native {', '.join(native)}" if native else "no native bf16/fp16"
        extra = f"; {self.features}" if self.features else ""
        threads = f", {self.threads} threads" if self.kind == "cpu" else ""
        return f"{self.kind} {self.name} ({what}{extra}{threads})"


# ------------------------------------------------------------------------------------------ the seam

_simulated: dict[str, Device] = {}
_detected: dict[str, Device] = {}


@contextlib.contextmanager
def simulate(*devices: Device):
    """Answer `device_facts` with these devices (one per kind) inside the block; a simulated CUDA device
    also becomes the compute device. For tests: no /proc or driver editing."""
    saved = dict(_simulated)
    _simulated.clear()
    _simulated.update({d.kind: d for d in devices})
    try:
        yield
    finally:
        _simulated.clear()
        _simulated.update(saved)


def compute_kind() -> str:
    """The device kind stages train on: cuda where there is one, else cpu. (MPS is reported by
    `device_facts('mps')`, but the Trainer stages decide on it themselves through accelerate.)"""
    if _simulated:
        return "cuda" if "cuda" in _simulated else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_facts(kind: str | None = None) -> Device:
    """The facts of the compute device (or of `kind`), detected once per process."""
    kind = kind or compute_kind()
    if kind in _simulated:
        return _simulated[kind]
    if _simulated and kind == "cpu":
        return _simulated.get("cpu") or Device("cpu", "simulated CPU", bf16=False, fp16=False, threads=1)
    if kind not in _detected:
        _detected[kind] = {"cpu": _detect_cpu, "cuda": _detect_cuda, "mps": _detect_mps}[kind]()
    return _detected[kind]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


# oneDNN's instruction-set levels (`ONEDNN_MAX_CPU_ISA`, or its old name `DNNL_MAX_CPU_ISA`), as far as they
# matter here: a cap below AVX512_CORE_BF16 switches its bf16 kernels off whatever the CPU has (bf16 matmuls
# then take PyTorch's reference gemm, about 1 GFLOP/s), and one below the AMX levels switches AMX off. A
# container, a cluster image or a user chasing numerics may set it.
_ISA_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")
_ISA_WITHOUT_AMX = ("AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16")
BF16_PAYS = 1.3  # bf16 autocast adds casts around every matmul: a smaller gain than this is not worth them


def isa_cap() -> tuple[str, tuple[str, ...]]:
    """The oneDNN instruction-set cap of this process and the CPU flags it switches off ("" and () if none)."""
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        value = os.environ.get(name, "").strip().upper()
        if value:
            off = ("avx512_bf16", "amx_bf16") if value in _ISA_WITHOUT_BF16 else \
                ("amx_bf16",) if value in _ISA_WITHOUT_AMX else ()
            return f"{name}={value}", off
    return "", ()


def _detect_cpu() -> Device:
    """Native bf16 on a CPU: AMX always pays (several times fp32's rate); AVX512-BF16 without AMX is measured
    (`bf16_speedup`), since on some CPUs oneDNN's AVX512-BF16 kernels run slower than fp32's. Flags come from
    torch's own CPU checks, else /proc/cpuinfo, less what the process caps off (`isa_cap`). Other CPUs (AVX2
    x86, and ARM, where no native path is measured here) multiply in fp32."""
    import torch

    flags = []
    try:
        if torch.cpu._is_avx512_bf16_supported():
            flags.append("avx512_bf16")
        if torch.cpu._is_amx_tile_supported():
            flags.append("amx_bf16")
    except AttributeError:  # an older torch: read the flags the kernel reports
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            text = ""
        flags = [f for f in ("avx512_bf16", "amx_bf16") if f" {f}" in text]
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
    cap, off = isa_cap()
    notes = [f"{', '.join(f for f in flags if f in off)} switched off by {cap}"] if set(flags) & set(off) else []
    flags = [f for f in flags if f not in off]
    name = _cpu_name()
    bf16 = "amx_bf16" in flags
    if flags == ["avx512_bf16"]:
        speedup = bf16_speedup(f"{name}|{cap}")
        bf16 = speedup >= BF16_PAYS
        notes.append(f"without AMX, bf16 matmuls measured at {speedup:.2f}x fp32's rate")
    found = ", ".join(flags) if flags else ", ".join(filter(None, [capability, "no AVX512-BF16/AMX"]))
    features = "; ".join([found, *notes])
    return Device("cpu", name, bf16=bf16, fp16=False, threads=torch.get_num_threads(), features=features)


def _detect_cuda() -> Device:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return Device("cuda", torch.cuda.get_device_name(), bf16=torch.cuda.is_bf16_supported(),
                  fp16=major >= 7 or (major, minor) >= (6, 0), threads=torch.get_num_threads(),
                  features=f"compute capability {major}.{minor}")


def _detect_mps() -> Device:
    """Apple GPUs: fp16 always; bf16 from macOS 14 where torch says so."""
    import torch

    bf16 = bool(getattr(torch.backends.mps, "is_macos_or_newer", lambda *a: False)(14, 0))
    return Device("mps", "Apple GPU", bf16=bf16, fp16=True, threads=torch.get_num_threads())


# ------------------------------------------------------------------------------------------ the rules


@dataclass
class Precision:
    """A stage's resolved precision. `weights`: the dtype the model loads in; `autocast`: the autocast dtype
    of training passes (None: none); `loss_scaling`: fp16 autocast needs a gradient scaler; `inference`:
    the autocast dtype of no-grad passes (reference, scoring, evaluation, sampling); `reasons` say why,
    `warnings` what an explicit setting costs on this device."""

    device: Device
    weights: str
    autocast: str | None
    loss_scaling: bool
    inference: str | None
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def sampling(self) -> str:
        """The RL sampling copy's dtype: what sampling multiplies in anyway (no cast at every token)."""
        return self.inference or self.weights

    def describe(self) -> str:
        autocast = f"{self.autocast} autocast" + (" with loss scaling" if self.loss_scaling else "") \
            if self.autocast else "no autocast"
        return f"weights {self.weights}, {autocast}, no-grad passes in {self.inference or self.weights}: " \
               + "; ".join(self.reasons)

    def trainer_flags(self) -> dict:
        """`bf16`/`fp16` for transformers' TrainingArguments (fp16 there brings its GradScaler)."""
        return {"bf16": self.autocast == "bf16", "fp16": self.autocast == "fp16"}


def native(device: Device, dtype: str) -> bool:
    return dtype == "fp32" or getattr(device, dtype)


def best_half(device: Device) -> str | None:
    """The low-precision dtype this device multiplies natively (bf16 before fp16: no loss scaling)."""
    return "bf16" if device.bf16 else ("fp16" if device.fp16 and device.kind != "cpu" else None)


def resolve(dtype: str = "auto", mixed_precision: str = "auto", method: str = "lora",
            device: Device | None = None) -> Precision:
    """The precision a stage trains in.

    `auto` weights: bf16 on a GPU with bf16 (as the field trains there); else fp32 master weights (a GPU
    with fp16 only trains them under fp16 autocast: fp16 weights would put trainable heads in fp16, which a
    gradient scaler refuses). On a CPU the weights stay fp32: bf16 weights there round the residual stream
    too, and bf16 autocast already runs the matmuls in bf16.
    `auto` autocast: the device's native half dtype (bf16, else fp16 with loss scaling on a GPU), else none.
    An explicit dtype the device lacks is kept, with a warning that names the device and its measured cost.
    """
    device = device or device_facts()
    half = best_half(device)
    reasons: list[str] = []
    warnings: list[str] = []
    if dtype == "auto":
        if mixed_precision in LOW_PRECISION:
            weights, why = "fp32", f"fp32 master weights under the recipe's {mixed_precision} autocast"
        elif device.kind == "cuda" and device.bf16:
            weights, why = "bf16", "bf16 weights: this GPU multiplies bf16 natively"
        elif method == "qlora":
            weights, why = "fp32", "fp32 for the parts 4-bit quantization leaves"
        else:
            weights, why = "fp32", "fp32 master weights"
        reasons.append(why)
    else:
        weights = dtype
        reasons.append(f"weights {dtype}: set in the recipe")
        warnings += _cost_warning(device, dtype, "dtype")
    if weights in LOW_PRECISION:  # half weights run their matmuls in that dtype, adapters and heads alike
        autocast = weights
        reasons.append(f"{weights} autocast over {weights} weights (fp32 adapters and heads)")
        if mixed_precision not in ("auto", "no", weights):
            warnings.append(f"mixed_precision {mixed_precision} ignored: the weights are {weights}")
    elif mixed_precision == "auto":
        autocast = half
        evidence = f" ({device.features})" if device.features else ""
        if autocast:
            reasons.append(f"{autocast} autocast: this {device.kind} multiplies {autocast} natively{evidence}"
                           + ("; fp16 needs loss scaling" if autocast == "fp16" else ""))
        else:
            reasons.append(f"no autocast: this {device.kind} has no native bf16{evidence}, fp32 is fastest")
    elif mixed_precision == "no":
        autocast = None
        reasons.append("no autocast, fp32 no-grad passes: set in the recipe")
    else:
        autocast = mixed_precision
        reasons.append(f"{mixed_precision} autocast: set in the recipe")
        if device.kind == "cpu" and mixed_precision == "fp16":
            warnings.append("mixed_precision fp16 on a CPU: PyTorch has no fp16 autocast path worth having "
                            "there; use auto")
        else:
            warnings += _cost_warning(device, mixed_precision, "mixed_precision")
    loss_scaling = autocast == "fp16"  # fp16 gradients underflow without a scaler
    inference = None if mixed_precision == "no" and weights == "fp32" else _inference(device, weights)
    return Precision(device=device, weights=weights, autocast=autocast, loss_scaling=loss_scaling,
                     inference=inference, reasons=reasons, warnings=warnings)


def stage_precision(cfg, device: Device | None = None) -> Precision:
    """The precision of one stage's config (its `dtype`, `mixed_precision`, `method`)."""
    return resolve(cfg.dtype, cfg.mixed_precision, cfg.method, device)


def quant_compute_dtype(cfg, device: Device | None = None) -> str:
    """4-bit layers dequantize into this dtype for their matmuls: the recipe's `quant.compute_dtype`, and
    for `auto` the stage's autocast dtype, else fp32 (bf16 compute on a CPU without bf16 is 10-20x slower)."""
    if cfg.quant.compute_dtype != "auto":
        return cfg.quant.compute_dtype
    return stage_precision(cfg, device).autocast or "fp32"


def _inference(device: Device, weights: str) -> str | None:
    """No-grad passes run in the device's native half dtype over fp32 weights (results returned in fp32 by
    the callers); weights already in a half dtype run as they are. `ALIGN_BF16_INFERENCE=0` keeps exact
    fp32 (reproducible scores)."""
    if weights in LOW_PRECISION:
        return weights
    if os.environ.get("ALIGN_BF16_INFERENCE") == "0":
        return None
    return best_half(device)


MARK = "_align_inference_dtype"


def mark(model, precision: Precision):
    """Remember on a stage's model the dtype its no-grad passes run in (`mixed_precision: no` keeps them in
    fp32 too); `inference_dtype` reads it back. Returns the model."""
    setattr(model, MARK, precision.inference or "fp32")
    return model


def inference_dtype(model) -> str | None:
    """The autocast dtype for no-grad passes of `model` (on the device its weights are on), or None: what its
    stage resolved (`mark`), else the device's rule."""
    import torch

    param = next(model.parameters())
    if param.dtype != torch.float32:
        return None  # half weights (or 4-bit layers' fp32 remainder under their own compute dtype)
    marked = getattr(model, MARK, None)
    if marked is not None:
        return None if marked == "fp32" else marked
    kind = param.device.type if param.device.type in ("cpu", "cuda", "mps") else "cpu"
    if kind != "cpu" and kind != compute_kind() and not _simulated:
        return None
    return _inference(device_facts(kind), "fp32")


def inference_autocast(model):
    """The autocast context for no-grad passes of `model` (a null context where they stay in fp32)."""
    import torch

    dtype = inference_dtype(model)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=torch_dtype(dtype))


def torch_dtype(name: str):
    """The torch dtype of a precision name (fp32, bf16, fp16)."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


# ------------------------------------------------------------------------------------------ the probe


def _cost_warning(device: Device, dtype: str, key: str) -> list[str]:
    """A warning for an explicit half dtype the device does not multiply natively, with its measured cost."""
    if dtype not in LOW_PRECISION or native(device, dtype):
        return []
    cost = ""
    if device.kind == "cpu":
        rates = matmul_probe(device)
        if rates.get(dtype) and rates.get("fp32"):
            ratio = rates["fp32"] / rates[dtype]
            how = f"{ratio:.1f}x slower" if ratio >= 1 else f"{1 / ratio:.1f}x faster"
            cost = (f": {dtype} matmuls measured at {rates[dtype]:.1f} GFLOP/s against {rates['fp32']:.1f} "
                    f"for fp32 ({how})")
    return [f"{key} {dtype} on {device.describe()}, which does not multiply {dtype} natively{cost}; "
            f"set {key}: auto to let align choose"]
