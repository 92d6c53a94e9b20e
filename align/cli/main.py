"""The `align` command: the parser, logging and warnings set up once, and errors turned into exit codes.

Each command group is its own module (`align.cli.run`, `models`, `evaluate`, `export`, `chat`): thin
wrappers over the library. `python -m align.cli.main` is how `--nproc` re-executes a run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from align.cli import chat, evaluate, export, models, playground, run
from align.errors import AlignError


def _version() -> str:
    """The installed package's version, with the library versions a bug report needs."""
    from importlib import metadata

    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return (f"{installed('align')} (python {sys.version.split()[0]}, torch {installed('torch')}, transformers "
            f"{installed('transformers')}, trl {installed('trl')}, peft {installed('peft')})")


class _PrintVersion(argparse.Action):
    """`align --version`: one unwrapped line (argparse's own version action wraps it to the terminal)."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"align {_version()}")
        parser.exit()


# Every subcommand's parser, in the order `align --help` lists them.
SUBCOMMANDS = (
    run.add_recipes,
    run.add_plan,
    run.add_run,
    evaluate.add_score,
    export.add_merge,
    export.add_export,
    export.add_check_export,
    evaluate.add_eval,
    evaluate.add_report,
    chat.add_chat,
    playground.add_playground,
    models.add_models,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align", description="Post-training alignment: SFT, reward models, PPO, DPO.")
    parser.add_argument("--registry", help="registry folder (default: $ALIGN_REGISTRY or ./registry)")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--version", action=_PrintVersion, nargs=0, help="print the versions of align and its "
                        "main libraries, and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from align.runtime.distributed import is_main

    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level if is_main() else logging.WARNING,  # one process speaks for a run
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_libraries(args.verbose, " ".join(filter(None, (args.command, getattr(args, "models_cmd", None)))))
    try:
        code = args.fn(args)
        sys.stdout.flush()  # a reader that went away (`| head -1`) shows up here, not at interpreter exit
        return code
    except AlignError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _reader_gone()
    except Exception as err:
        return _disk_full(err)


# The commands that load weights, where transformers would draw a "Loading weights" bar per model.
LOADS_WEIGHTS = {"run", "score", "merge", "export", "check-export", "eval", "report", "chat", "playground",
                 "models pull"}


def quiet_libraries(verbose: bool, command: str | None = None) -> None:
    """The console shows align's own lines: the libraries' deprecation notices (transformers' renamed
    arguments, torch's), bitsandbytes' note about an optional CPU kernel package and transformers' bar for
    each model it loads (a fraction of a second, drawn several times a stage) say nothing a user of align can
    act on. `--verbose` shows them. Download bars stay: they are the hub library's own, and show progress."""
    import warnings

    if verbose:
        return
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(transformers|torch|peft|trl|accelerate)\b")
    warnings.filterwarnings("ignore", message=r".*(is deprecated|will be removed).*", category=UserWarning)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if command in LOADS_WEIGHTS:  # the others stay quick to start: importing transformers takes a second
        from transformers.utils import logging as hf_logging

        hf_logging.set_tqdm_hook(_without_weight_loading_bars)


def _without_weight_loading_bars(factory, args, kwargs):
    """transformers' tqdm hook: its "Loading weights" bars are drawn disabled, every other bar as it was."""
    if kwargs.get("desc") == "Loading weights":
        kwargs = {**kwargs, "disable": True}
    return factory(*args, **kwargs)


def _reader_gone() -> int:
    """stdout's reader closed the pipe (`align models show REF | head -1`): stop quietly, as `cat` would,
    with the status of a process ended by SIGPIPE; stdout goes to /dev/null so the exit flush is silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # stdout is not a file (captured)
        pass
    return 141


def _disk_full(err: Exception) -> int:
    """A full disk that no narrower handler named (a library's own write): one clear line; else re-raise."""
    from align.runtime.diskspace import disk_full_error, is_disk_full

    if not is_disk_full(err):
        raise err
    path = getattr(err, "filename", None) or os.getcwd()
    print(f"error: {disk_full_error(path, None, '', err)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
