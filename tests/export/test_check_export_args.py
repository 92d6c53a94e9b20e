"""`align check-export` refuses a bad `--dtypes` value, naming it, before it exports anything or asks for
llama-cpp-python (runs without llama.cpp installed: the refusal comes first)."""

from __future__ import annotations

from align.cli.main import main


def test_an_unknown_dtype_is_named_before_any_export(tmp_path, capsys):
    registry = tmp_path / "registry"
    assert main(["--registry", str(registry), "check-export", "no-such/entry", "--dtypes", "f16,q4_k"]) == 2
    err = capsys.readouterr().err
    assert "--dtype q4_k" in err and "f16" in err and "Traceback" not in err
    assert not registry.exists() or not any(registry.rglob("*.gguf"))
