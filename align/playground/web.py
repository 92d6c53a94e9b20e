"""`align playground`'s web app: one HTML page and a small JSON API over `Models` and `PreferenceLog`.

Starlette (with uvicorn to serve it) rather than Gradio: the page needs columns that stream at once,
a stop button that reaches the generating thread, and preference clicks written in our own row format;
that is a page of plain JavaScript over four routes, with two small, well-kept dependencies (the
`playground` extra) instead of Gradio's large install and its own component model. Nothing is fetched
from the network: the page has no external scripts or styles.

Routes: `GET /` the page; `GET /api/state` the models to pick from, the judge, the preference file's
counts; `POST /api/answer` streams one column's answer as JSON lines ({"type": "text"} chunks, then
{"type": "done"} with timings and score, or {"type": "error"}); `POST /api/stop` stops answers by id;
`POST /api/preference` writes a pick.
"""

from __future__ import annotations

import json
import queue
import threading
from importlib import resources

from align.errors import AlignError

PAGE = "page.html"


def settings_from(values: dict | None, base):
    """GenerationSettings from the page's values over `base`; a bad value raises `ConfigError` naming it."""
    from align.models.generation import settings_with

    allowed = set(type(base).model_fields)
    given = {k: v for k, v in (values or {}).items() if v not in (None, "")}
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise AlignError(f"unknown generation setting(s): {', '.join(unknown)}")
    return settings_with(base, given)


def make_app(models, preferences, columns: list[str], base_settings):
    """The Starlette app. `columns`: the refs the page opens with (one to four)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.routing import Route

    page = resources.files("align.playground").joinpath(PAGE).read_text(encoding="utf-8")
    running: dict[str, threading.Event] = {}

    async def index(request: Request):
        return HTMLResponse(page)

    async def state(request: Request):
        from starlette.concurrency import run_in_threadpool

        choices = await run_in_threadpool(models.choices)
        judge = {"ref": models.judge.ref, "kind": models.judge.kind} if models.judge else None
        return JSONResponse({"models": choices, "columns": columns, "judge": judge,
                             "preferences": preferences.counts(), "settings": base_settings.model_dump()})

    async def answer(request: Request):
        body = await request.json()
        try:
            settings = settings_from(body.get("settings"), base_settings)
            messages = _messages(body.get("messages"))
            ref = str(body.get("ref") or "")
            seed = body.get("seed")
            seed = None if seed in (None, "") else int(seed)
            await _run(models.source, ref)  # unknown refs and reward models answer 400, not a broken stream
        except (AlignError, ValueError, TypeError) as err:
            return JSONResponse({"error": str(err)}, status_code=400)
        answer_id = str(body.get("id") or id(body))
        stop = running[answer_id] = threading.Event()
        events: queue.Queue = queue.Queue()

        def produce():
            try:
                for event in models.answer(ref, messages, settings, seed=seed, stop=stop):
                    events.put(event)
            except Exception as err:  # noqa: BLE001 - shown in the column, the server goes on
                events.put({"type": "error", "message": f"{type(err).__name__}: {err}"})
            finally:
                events.put(None)
                running.pop(answer_id, None)

        threading.Thread(target=produce, daemon=True, name=f"answer-{answer_id}").start()

        async def lines():
            try:
                while True:
                    event = await _run(events.get)
                    if event is None:
                        return
                    yield json.dumps({**event, "id": answer_id}) + "\n"
            finally:  # the page went away: the answer stops at its next token
                stop.set()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def stop(request: Request):
        body = await request.json()
        ids = body.get("ids") or []
        stopped = [i for i in ids if i in running]
        for answer_id in stopped:
            running[answer_id].set()
        return JSONResponse({"stopped": stopped})

    async def preference(request: Request):
        body = await request.json()
        try:
            counts = preferences.record(_messages(body.get("prompt")), list(body.get("answers") or []),
                                        str(body.get("verdict")))
        except (ValueError, TypeError) as err:
            return JSONResponse({"error": str(err)}, status_code=400)
        return JSONResponse(counts)

    return Starlette(routes=[Route("/", index), Route("/api/state", state),
                             Route("/api/answer", answer, methods=["POST"]),
                             Route("/api/stop", stop, methods=["POST"]),
                             Route("/api/preference", preference, methods=["POST"])])


async def _run(fn, *args):
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn, *args)


def _messages(value) -> list[dict]:
    """Chat messages from the page, checked: roles system/user/assistant, string contents, ending with the
    user's message."""
    if not isinstance(value, list) or not value:
        raise ValueError("messages must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be {{role: system|user|assistant, content: text}}")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise ValueError("the last message must be the user's")
    return out
