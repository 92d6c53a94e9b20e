"""`align run --nproc N --engine ddp|fsdp|zero2|zero3`: the same command again, under `accelerate launch`.

Why re-execute rather than spawn processes ourselves: accelerate already knows how to start N processes on
one or many machines (torchrun underneath) and how to set up DDP, FSDP or DeepSpeed from a config file; the
stages only need to run under it. So the CLI checks what it can cheaply (the recipe, the engine's config
file, DeepSpeed being installed) and then becomes
`accelerate launch --config_file recipes/accelerate/<engine>.yaml --num_processes N -m align.cli.main run ...`.
A user who prefers to call `accelerate launch` directly gets the same behaviour.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from align.errors import ConfigError, Problem

ENGINES = ("ddp", "fsdp", "zero2", "zero3")
CONFIG_DIR = Path(__file__).resolve().parents[2] / "recipes" / "accelerate"
# Our flags and the `accelerate launch` flags they become (machine settings pass through unchanged).
MACHINE_FLAGS = {"--num-machines": "--num_machines", "--machine-rank": "--machine_rank",
                 "--main-process-ip": "--main_process_ip", "--main-process-port": "--main_process_port"}
OUR_FLAGS = ("--nproc", "--engine", *MACHINE_FLAGS)


def engine_config(engine: str) -> Path:
    """The accelerate config file for `engine` (a name from ENGINES, or a path to a config YAML)."""
    if engine in ENGINES:
        for folder in (Path.cwd() / "recipes" / "accelerate", CONFIG_DIR):
            if (folder / f"{engine}.yaml").is_file():
                return folder / f"{engine}.yaml"
        raise ConfigError([Problem("--engine", f"recipes/accelerate/{engine}.yaml not found (looked in the current "
                                               f"folder and in {CONFIG_DIR})")])
    path = Path(engine)
    if not path.is_file():
        raise ConfigError([Problem(f"--engine {engine}", f"expected one of {', '.join(ENGINES)} or an accelerate "
                                   "config file")])
    return path


def uses_deepspeed(config: Path) -> bool:
    import yaml

    return (yaml.safe_load(config.read_text()) or {}).get("distributed_type") == "DEEPSPEED"


def require_deepspeed(what: str) -> None:
    """DeepSpeed is an optional extra: say how to get it, before any process starts or any weights load."""
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError([Problem(what, "needs DeepSpeed, which is not installed: pip install -e '.[deepspeed]' "
                                         "(or pip install deepspeed); or use --engine ddp or fsdp")])


def check_running_engine() -> None:
    """Under `accelerate launch` with a DeepSpeed config (called directly, not through --engine), the same
    check as the launcher's."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        require_deepspeed("this accelerate config (distributed_type: DEEPSPEED)")


def strip_our_flags(argv: list[str]) -> list[str]:
    """`argv` without --nproc, --engine and the machine settings (`--flag value` or `--flag=value`)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in OUR_FLAGS:
            skip = True
            continue
        if arg.split("=", 1)[0] in OUR_FLAGS:
            continue
        out.append(arg)
    return out


def launch_command(argv: list[str], nproc: int, engine: str, machines: dict[str, str | int | None]) -> list[str]:
    """The `accelerate launch` command that runs `align <argv>` (our flags removed) in `nproc` processes."""
    config = engine_config(engine)
    if uses_deepspeed(config):
        require_deepspeed(f"--engine {engine}")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--num_processes", str(nproc)]
    for flag, value in machines.items():
        if value is not None:
            command += [MACHINE_FLAGS[flag], str(value)]
    return command + ["-m", "align.cli.main", *strip_our_flags(argv)]


def relaunch(argv: list[str], nproc: int, engine: str, machines: dict) -> int:
    """Run `align <argv>` under accelerate in `nproc` processes; returns its exit status."""
    command = launch_command(argv, nproc, engine, machines)
    print("launching: " + " ".join(command), file=sys.stderr, flush=True)
    return subprocess.call(command)
