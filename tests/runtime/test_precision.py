"""Precision from the machine at hand (`align.runtime.precision`), checked through its one seam (`simulate`) for a CPU
with and without native bf16 and a GPU with and without bf16, over every shipped recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from align.runtime import precision
from align.runtime.precision import Device, resolve, simulate, stage_precision

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
STAGE_RECIPES = [p for p in RECIPES if "accelerate" not in p.parts]

AVX2 = Device("cpu", "AMD EPYC 7B13", bf16=False, fp16=False, threads=2, features="AVX2, no AVX512-BF16/AMX")
AVX512_BF16 = Device("cpu", "Intel Xeon (Sapphire Rapids)", bf16=True, fp16=False, threads=2,
                     features="avx512_bf16, amx_bf16")
A100 = Device("cuda", "NVIDIA A100", bf16=True, fp16=True, features="compute capability 8.0")
T4 = Device("cuda", "Tesla T4", bf16=False, fp16=True, features="compute capability 7.5")


def test_cpu_without_native_bf16_trains_in_fp32():
    p = resolve("auto", "auto", "lora", AVX2)
    assert (p.weights, p.autocast, p.inference, p.loss_scaling) == ("fp32", None, None, False)
    assert p.trainer_flags() == {"bf16": False, "fp16": False}
    assert "no native bf16" in p.describe() and "AVX2" in p.describe()


def test_cpu_with_native_bf16_autocasts_over_fp32_master_weights():
    for method in ("lora", "full", "qlora"):
        p = resolve("auto", "auto", method, AVX512_BF16)
        assert (p.weights, p.autocast, p.inference, p.sampling) == ("fp32", "bf16", "bf16", "bf16")
        assert p.trainer_flags() == {"bf16": True, "fp16": False}


def test_gpu_with_bf16_trains_in_bf16():
    p = resolve("auto", "auto", "lora", A100)
    assert (p.weights, p.autocast, p.loss_scaling) == ("bf16", "bf16", False)


def test_gpu_without_bf16_gets_fp16_autocast_with_loss_scaling_never_bf16():
    for method in ("lora", "full"):
        p = resolve("auto", "auto", method, T4)
        assert (p.weights, p.autocast, p.loss_scaling, p.inference) == ("fp32", "fp16", True, "fp16")
        assert p.trainer_flags() == {"bf16": False, "fp16": True}
        assert "bf16" not in (p.weights, p.autocast, p.inference)


def test_explicit_bf16_on_a_cpu_without_it_warns_naming_the_device():
    p = resolve("bf16", "auto", "lora", AVX2)
    assert p.weights == "bf16"  # kept: the user asked for it
    assert len(p.warnings) == 1
    assert "AMD EPYC 7B13" in p.warnings[0] and "does not multiply bf16 natively" in p.warnings[0]
    assert "auto" in p.warnings[0]
    assert resolve("bf16", "auto", "lora", AVX512_BF16).warnings == []
    assert resolve("fp32", "bf16", "lora", T4).warnings  # bf16 autocast on a T4: named too


def test_warning_carries_the_measured_cost_on_a_real_cpu(monkeypatch, tmp_path):
    """On a real (not simulated) CPU without native bf16 the warning quotes the matmul probe."""
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path))
    real = precision.device_facts("cpu")
    lacking = Device("cpu", real.name, bf16=False, fp16=False, threads=real.threads, features=real.features)
    warning = precision._cost_warning(lacking, "bf16", "dtype")[0]
    assert "bf16 matmuls measured at" in warning and "GFLOP/s against" in warning
    assert "x slower" in warning or "x faster" in warning


def test_mixed_precision_no_and_explicit_autocast():
    assert resolve("auto", "no", "lora", AVX512_BF16).autocast is None
    assert resolve("auto", "bf16", "lora", AVX2).autocast == "bf16"
    fp16 = resolve("auto", "fp16", "full", A100)
    assert fp16.autocast == "fp16" and fp16.loss_scaling


def test_quant_compute_dtype_follows_the_machine(tiny_recipe_stage):
    from align.runtime.precision import quant_compute_dtype

    cfg = tiny_recipe_stage(method="qlora")
    assert quant_compute_dtype(cfg, AVX2) == "fp32"
    assert quant_compute_dtype(cfg, AVX512_BF16) == "bf16"
    assert quant_compute_dtype(cfg, T4) == "fp16"


@pytest.fixture
def tiny_recipe_stage():
    from align.config.loading import validate_recipe

    def build(**fields):
        raw = {"name": "p", "base": "hf-internal/x", "stages": {"sft": {"kind": "sft", "data": "d.jsonl", **fields}}}
        return validate_recipe(raw, []).stages["sft"]

    return build


def test_no_shipped_recipe_names_a_hardware_specific_precision():
    """Stage recipes leave precision at `auto`; accelerate's configs leave it to the stage ("no")."""
    import yaml

    found = []
    for path in RECIPES:
        raw = yaml.safe_load(path.read_text())

        def walk(node, where):
            if isinstance(node, dict):
                for key, value in node.items():
                    here = f"{where}.{key}" if where else str(key)
                    allowed = ("auto", None, "no") if "accelerate" in path.parts else ("auto", None)
                    if key in ("dtype", "mixed_precision", "compute_dtype") and value not in allowed:
                        found.append(f"{path.relative_to(ROOT)}: {here}: {value}")
                    walk(value, here)

        walk(raw, "")
    assert found == []


@pytest.mark.parametrize("device", [AVX2, AVX512_BF16, A100, T4], ids=lambda d: d.name)
@pytest.mark.parametrize("path", STAGE_RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_resolves_right_on_every_device(path, device):
    from align.config.loading import load_recipe

    recipe = load_recipe(path)
    with simulate(device):
        for name, cfg in recipe.stages.items():
            p = stage_precision(cfg)
            assert p.warnings == [], f"{path.name} stages.{name}: {p.warnings}"
            if device.kind == "cpu":
                assert p.weights == "fp32"
                assert p.autocast == ("bf16" if device.bf16 else None)
            elif device.bf16:
                assert (p.weights, p.autocast) == ("bf16", "bf16")
            else:
                assert (p.weights, p.autocast, p.loss_scaling) == ("fp32", "fp16", True)


def test_plan_prints_each_stages_precision_and_warns_on_explicit_bf16(tmp_path):
    from align.pipeline.plan import make_plan
    from align.config.loading import load_recipe
    from align.registry.store import Registry

    recipe = load_recipe(ROOT / "recipes/smollm2/quickstart.yaml", ["stages.ppo.dtype=bf16"])
    with simulate(AVX2):
        plan = make_plan(recipe, Registry(tmp_path / "registry"), check_hub=False)
        text = plan.describe()
    assert "device: cpu AMD EPYC 7B13" in text
    assert "precision: weights fp32, no autocast" in text  # the stages left at auto
    assert "attention: sdpa" in text and "threads: 2" in text
    assert [w.split(":")[0] for w in plan.warnings()] == ["stages.ppo"]
    assert "dtype bf16" in plan.warnings()[0] and "AMD EPYC 7B13" in plan.warnings()[0]


def test_inference_dtype_follows_the_device_of_the_weights():
    model = torch.nn.Linear(4, 4)
    with simulate(AVX2):
        assert precision.inference_dtype(model) is None
    with simulate(AVX512_BF16):
        assert precision.inference_dtype(model) == "bf16"
        with precision.inference_autocast(model):
            assert model(torch.randn(2, 4)).dtype == torch.bfloat16
    assert precision.inference_dtype(model.to(torch.bfloat16)) is None  # half weights run as they are


def test_ppo_trainer_scales_fp16_losses(monkeypatch):
    """A GradScaler comes with fp16 autocast and is saved with the trainer's state (exact resume)."""
    from align.config.stages import PPOStage
    from align.rl.ppo import PPOTrainer
    from align.rl.settings import PPOSettings

    settings = PPOSettings.from_stage(PPOStage(prompts="p.jsonl", rewards=[{"checker": "regex"}], method="full",
                                               lr=1e-3, scheduler="constant", kl={"coef": 0.0, "penalty": "loss"}))

    class Rewards:
        def state_dict(self):
            return {}

    model = torch.nn.Linear(2, 2)
    with_scaler = PPOTrainer(settings, model, None, Rewards(), reference=model, autocast="fp16")
    assert with_scaler.scaler is not None and with_scaler.state_dict()["scaler"] is not None
    assert PPOTrainer(settings, model, None, Rewards(), reference=model, autocast="bf16").scaler is None


def test_mixed_precision_no_keeps_no_grad_passes_in_fp32_too():
    """A stage that says `mixed_precision: no` gets exact fp32 reference and scoring passes as well."""
    p = resolve("auto", "no", "lora", AVX512_BF16)
    assert (p.autocast, p.inference) == (None, None)
    model = precision.mark(torch.nn.Linear(4, 4), p)
    with simulate(AVX512_BF16):
        assert precision.inference_dtype(model) is None
        assert precision.inference_dtype(precision.mark(torch.nn.Linear(4, 4), resolve(device=AVX512_BF16))) == "bf16"


def test_plan_warns_that_qlora_on_a_cpu_is_slow(tmp_path):
    """Issue 31.9: QLoRA on a CPU runs bitsandbytes' CPU kernels, far slower than LoRA for little memory;
    the plan says so (and says nothing of the kind on a GPU)."""
    from align.pipeline.plan_machine import machine_notes
    from align.config.loading import load_recipe

    recipe = load_recipe(ROOT / "recipes/smollm2/quickstart.yaml", ["stages.sft.method=qlora"])
    with simulate(AVX2):
        _, warnings = machine_notes(recipe.stages["sft"])
        assert any("qlora on a CPU" in w and "method: lora" in w for w in warnings)
        assert machine_notes(recipe.stages["reward"])[1] == []
    with simulate(A100):
        assert machine_notes(recipe.stages["sft"])[1] == []


def _cpu_flags(monkeypatch, avx512_bf16: bool, amx: bool, cap: str | None = None):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)


@pytest.mark.parametrize("cap, native", [("AVX2", False), ("avx512_core", False), ("AVX512_CORE_BF16", False),
                                         ("AVX10_1_512_AMX", True), (None, True)])
def test_a_onednn_cap_switches_off_the_kernels_it_names(monkeypatch, cap, native):
    """A CPU whose flags say AVX512-BF16 and AMX, in a process that caps oneDNN (ONEDNN_MAX_CPU_ISA): below
    AVX512_CORE_BF16 its bf16 matmuls take the reference gemm; at AVX512_CORE_BF16 AMX is off, and the
    AVX512-BF16 kernels left are measured (here: slower than fp32), so `auto` trains in fp32 in both."""
    _cpu_flags(monkeypatch, avx512_bf16=True, amx=True, cap=cap)
    monkeypatch.setattr(precision, "bf16_speedup", lambda machine: 0.5)
    device = precision._detect_cpu()
    assert device.bf16 is native
    p = resolve("auto", "auto", "lora", device)
    assert p.autocast == ("bf16" if native else None)
    if not native:
        assert f"switched off by ONEDNN_MAX_CPU_ISA={cap.upper()}" in p.describe()


@pytest.mark.parametrize("speedup, native", [(0.5, False), (1.1, False), (2.4, True)])
def test_avx512_bf16_without_amx_autocasts_only_where_bf16_measures_faster(monkeypatch, speedup, native):
    """On some CPUs with AVX512-BF16 but no AMX oneDNN's bf16 matmuls run at half fp32's rate; the flag alone
    must not choose bf16 there. AMX is not measured: it multiplies bf16 several times faster wherever found."""
    _cpu_flags(monkeypatch, avx512_bf16=True, amx=False)
    monkeypatch.setattr(precision, "bf16_speedup", lambda machine: speedup)
    device = precision._detect_cpu()
    assert device.bf16 is native and f"measured at {speedup:.2f}x fp32's rate" in device.features
    assert resolve("auto", "auto", "lora", device).autocast == ("bf16" if native else None)
    _cpu_flags(monkeypatch, avx512_bf16=True, amx=True)
    monkeypatch.setattr(precision, "bf16_speedup", lambda machine: pytest.fail("AMX was measured"))
    assert precision._detect_cpu().bf16
