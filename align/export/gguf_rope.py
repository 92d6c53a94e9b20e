"""Scaled RoPE in a GGUF file as llama.cpp applies it: Llama 3.1-3.3's `llama3` frequencies and linear scaling.

Why it is built this way:
- llama.cpp has no `llama3` rope type. Its converter writes a `rope_freqs` tensor instead, one factor per
  rotary pair that divides that pair's base frequency (`ggml_rope_ext`'s freq_factors), and its llama
  architecture (our llama and mistral layouts) reads it; its qwen2, qwen3 and gemma2 pass no factors. We compute
  the factors from the config as transformers' `llama3` init does: pairs whose wavelength is under
  original/high_freq_factor are kept, over original/low_freq_factor divided by `factor`, the band between
  interpolated. `original_max_position_embeddings` comes from the rope parameters, where transformers reads
  it (llama.cpp's converter looks at the top of config.json and falls back to 8192, Llama 3.1's and 3.2's value).
- Linear scaling is one generic key in llama.cpp (`rope.scaling.factor`: every frequency times 1/factor, the
  same as transformers' `linear`), read by every architecture's hyperparameters.
- transformers' GGUF loader (the export's own check) reads neither `rope_freqs` nor the scaling keys for these
  architectures, so it would reload the file with plain RoPE. The file therefore also carries the source's rope
  parameters as JSON under `align.rope_parameters`, which `reload_config` gives back to the config, and the
  reload check (`check_frequencies`) compares the reloaded model's frequencies with the ones llama.cpp computes
  from the file's own keys and `rope_freqs`: a wrong or missing tensor fails there, and the logits compared
  next are those of the frequencies llama.cpp runs.
- The other types are refused: longrope's factors are picked by context size in llama.cpp but by sequence
  length in transformers; dynamic NTK rescales by sequence length at run time, which llama.cpp never does;
  YaRN (its ramp and attention factor) is not checked against llama.cpp's own.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from align.errors import ExportError

ROPE_PARAMETERS_KEY = "align.rope_parameters"
_REASONS = {
    "longrope": "Phi-3's long-context RoPE (longrope) is not written: llama.cpp picks its long or short factors by "
                "context size, transformers by sequence length",
    "yarn": "RoPE scaling 'yarn' is not written: its ramp and attention factor are not checked against llama.cpp's",
    "dynamic": "RoPE scaling 'dynamic' is not written: it rescales by sequence length at run time, which llama.cpp "
               "never does",
}


def rope_type(rope: dict) -> str:
    return rope.get("rope_type", rope.get("type", "default"))


def scaling_problems(rope: dict, arch: str, scaled: tuple[str, ...]) -> list[str]:
    """Why `rope` (a config's rope parameters) cannot be written for llama.cpp architecture `arch`, whose
    layout writes the scaled types `scaled`."""
    kind = rope_type(rope)
    if kind == "default" or kind in scaled:
        return []
    if kind in ("llama3", "linear"):
        return [f"RoPE scaling {kind!r} is written for llama.cpp's llama only (checked there), not its {arch}"
                + (", which reads no rope_freqs" if kind == "llama3" else "")]
    return [_REASONS.get(kind, f"RoPE scaling {kind!r} is not written by this exporter (llama3 and linear are)")]


def base_frequencies(theta: float, dims: int) -> torch.Tensor:
    """Each rotary pair's unscaled frequency, theta^(-2i/dims), in fp32 as transformers computes it."""
    return 1.0 / (theta ** (torch.arange(0, dims, 2, dtype=torch.int64).float() / dims))


def llama3_factors(rope: dict, dims: int) -> np.ndarray:
    """llama.cpp's `rope_freqs` for `llama3` scaling (`rope`: the config's rope parameters, `rope_theta`
    included): per rotary pair, what divides its base frequency."""
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    original = rope["original_max_position_embeddings"]
    wavelength = 2 * math.pi / base_frequencies(rope["rope_theta"], dims)
    smooth = (original / wavelength - low) / (high - low)
    interpolated = 1.0 / ((1 - smooth) / factor + smooth)
    factors = torch.where(wavelength > original / low, torch.full_like(wavelength, factor), interpolated)
    factors = torch.where(wavelength < original / high, torch.ones_like(wavelength), factors)
    return factors.numpy().astype(np.float32)


def add_rope_scaling(writer, rope: dict, dims: int) -> dict[str, int]:
    """Write a scaled RoPE the way llama.cpp reads it, and the source's parameters for the reload check;
    nothing for plain RoPE. Returns the tensors written by stored type."""
    import gguf

    kind = rope_type(rope)
    if kind == "default":
        return {}
    writer.add_string(ROPE_PARAMETERS_KEY, json.dumps(rope, sort_keys=True))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        return {}
    name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
    writer.add_tensor(name, llama3_factors(rope, dims))  # f32 always, as llama.cpp's converter stores it
    return {"F32": 1}


def written_rope_parameters(reader) -> dict | None:
    """The source's rope parameters a file carries (None for plain RoPE)."""
    field = reader.fields.get(ROPE_PARAMETERS_KEY)
    return None if field is None else json.loads(field.contents())


def file_frequencies(reader, keys: dict) -> torch.Tensor:
    """Each rotary pair's frequency as llama.cpp computes it from the file: freq_base^(-2i/n_rot), divided by
    `rope_freqs` where there is one, times 1/`rope.scaling.factor`."""
    frequencies = base_frequencies(float(keys["rope.freq_base"]), int(keys["rope.dimension_count"]))
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        frequencies = frequencies / torch.from_numpy(np.array(tensors["rope_freqs.weight"].data, dtype=np.float32))
    return frequencies / float(keys.get("rope.scaling.factor") or 1.0)


def check_frequencies(path, reader, keys: dict, model) -> float:
    """The reloaded `model`'s rotary frequencies against llama.cpp's from the file; the largest relative gap,
    or an `ExportError` when they differ."""
    expected = file_frequencies(reader, keys)
    gap = 0.0
    for module in model.modules():
        reloaded = getattr(module, "inv_freq", None)
        if not isinstance(reloaded, torch.Tensor):
            continue
        reloaded = reloaded.detach().float().cpu()
        relative = float(((reloaded - expected).abs() / expected).max()) if reloaded.shape == expected.shape \
            else math.inf
        if relative > 1e-5:
            raise ExportError(f"{path.name}: llama.cpp would rotate with other frequencies than the reloaded "
                              f"model ({expected.tolist()} from the file, {reloaded.tolist()} reloaded)")
        gap = max(gap, relative)
    return gap
