"""`align playground`: the web page that compares registry entries side by side and records preferences."""

from __future__ import annotations

from align.cli.common import generation_flags, generation_overrides, registry_of
from align.errors import AlignError

MAX_COLUMNS = 4


def cmd_playground(args) -> int:
    """Everything a bad argument can break is checked before any weights load or the server starts: the
    extra is installed, each ref answers, the judge judges, the port is free."""
    from align.config.schema import GenerationSettings
    from align.models.generation import settings_with

    _require_extra()
    registry = registry_of(args)
    settings = settings_with(GenerationSettings(max_new_tokens=256), generation_overrides(args))
    refs = args.refs or ["smollm2-135m-instruct"]
    if len(refs) > MAX_COLUMNS:
        raise AlignError(f"the playground shows at most {MAX_COLUMNS} columns; {len(refs)} refs given")
    from align.playground.models import Models, load_judge
    from align.playground.preferences import PreferenceLog

    models = Models(registry, dtype=args.dtype)
    for ref in refs:
        models.source(ref)  # unknown refs and reward models are refused here
    preferences = PreferenceLog(args.prefs)
    sock = _bind(args.host, args.port)
    try:
        if args.judge:
            models.judge = load_judge(args.judge, registry, rubric=args.rubric, mode=args.judge_score,
                                      dtype=args.dtype)
        columns = [models.policy(ref).ref for ref in refs]  # loaded once, before the first message
        return _serve(models, preferences, columns, settings, sock)
    finally:
        sock.close()


def _require_extra() -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise AlignError('the playground needs its extra: pip install "align[playground]" (starlette and '
                         "uvicorn)") from None


def _bind(host: str, port: int):
    """The listening socket, bound now so that a port in use is an error before anything loads."""
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise AlignError(f"--port {port}: cannot listen on {host}:{port} ({err.strerror or err}); pick another "
                         "port, or --port 0 for any free one") from None
    sock.listen(64)
    return sock


def _serve(models, preferences, columns, settings, sock) -> int:
    import uvicorn

    from align.playground.web import make_app

    host, port = sock.getsockname()[:2]
    url = f"http://{host if ':' not in host else '[' + host + ']'}:{port}/"
    print(f"playground ready at {url} (columns: {', '.join(columns)}; preferences go to {preferences.path}; "
          "Ctrl-C stops)", flush=True)
    server = uvicorn.Server(uvicorn.Config(make_app(models, preferences, columns, settings), log_level="warning",
                                           lifespan="off"))
    server.run(sockets=[sock])
    return 0


def add_playground(sub) -> None:
    """`align playground`'s arguments."""
    p = sub.add_parser("playground", help="a local web page: chat with up to 4 entries side by side, see the "
                       "judge's score, record which answer is better as preference data")
    p.add_argument("refs", nargs="*", metavar="REF", help="the entries the page opens with (up to 4; default: "
                   "smollm2-135m-instruct); any other entry can be picked on the page")
    p.add_argument("--judge", metavar="REF", help="score every answer: a reward entry, or a causal LM with --rubric")
    p.add_argument("--rubric", help="what a good answer is, for a causal-LM judge")
    p.add_argument("--judge-score", default="yes_no", choices=["yes_no", "scale"],
                   help="a causal-LM judge's verdict: log-odds of yes/no, or the expected 1-10 rating")
    p.add_argument("--prefs", default="data/playground/preferences.jsonl",
                   help="where preference rows go (default: data/playground/preferences.jsonl)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="default 7860; 0 = any free port")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    generation_flags(p, "256")
    p.set_defaults(fn=cmd_playground)
