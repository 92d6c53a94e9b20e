"""`align playground`'s server without a browser: answers stream per column with their timings and the
judge's score, one set of weights serves every column that shows it, the stop button ends an answer, picks
become rows the reward stage reads, and bad input is refused before anything loads or listens."""

from __future__ import annotations

import json
import socket
import threading

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")

from starlette.testclient import TestClient  # noqa: E402

from align.config.schema import GenerationSettings  # noqa: E402
from align.data.preference import load_pairs  # noqa: E402
from align.errors import AlignError  # noqa: E402
from align.playground.models import Models, load_judge  # noqa: E402
from align.playground.preferences import PreferenceLog  # noqa: E402
from align.playground.web import make_app  # noqa: E402
from tests.playground.helpers import playground_registry  # noqa: E402

QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_base):
    return playground_registry(tmp_path_factory.mktemp("playground") / "registry", tiny_base)


@pytest.fixture(scope="module")
def models(registry):
    models = Models(registry, dtype="fp32")
    models.judge = load_judge("tiny/reward", registry)
    return models


@pytest.fixture
def client(models, tmp_path):
    log = PreferenceLog(tmp_path / "prefs.jsonl")
    app = make_app(models, log, ["tiny/a@1", "tiny/b@1"], GenerationSettings(max_new_tokens=12, temperature=1.0))
    with TestClient(app) as client:
        client.log = log
        yield client


def _answer(client, ref, **body) -> list[dict]:
    with client.stream("POST", "/api/answer", json={"id": f"{ref}-{len(body)}", "ref": ref,
                                                    "messages": QUESTION, **body}) as resp:
        assert resp.status_code == 200, resp.read()
        return [json.loads(line) for line in resp.iter_lines() if line.strip()]


def test_the_page_and_its_state_list_the_answering_entries_with_lineage(client):
    assert "align playground" in client.get("/").text
    state = client.get("/api/state").json()
    refs = {m["ref"]: m for m in state["models"]}
    assert set(refs) == {"tiny/a@1", "tiny/b@1"}  # the reward entry judges; it does not answer
    assert refs["tiny/b@1"]["parent"] == "tiny-base" and refs["tiny/b@1"]["metrics"]["math_answer_pass_rate"] == 0.5
    assert state["judge"] == {"ref": "tiny/reward@1", "kind": "reward"}
    assert state["columns"] == ["tiny/a@1", "tiny/b@1"] and state["settings"]["max_new_tokens"] == 12


def test_each_column_streams_its_own_models_answer_with_timings_and_the_judges_score(client, models):
    import torch

    from align.data.tokenize import encode_prompt
    from align.models.generation import generate

    for ref in ("tiny/a", "tiny/b"):
        events = _answer(client, ref, seed=3)
        texts, done = [e for e in events if e["type"] == "text"], events[-1]
        assert len(texts) > 1 and done["type"] == "done"  # streamed in pieces, then one summary
        assert "".join(e["text"] for e in texts).strip() == done["text"].strip()
        assert done["tokens"] == 12 and done["ttft_s"] > 0 and done["tpot_s"] > 0 and done["tokens_per_s"] > 0
        policy = models.policy(ref)
        torch.manual_seed(3)
        [direct] = generate(policy.model, policy.tokenizer, [encode_prompt(policy.tokenizer, QUESTION)],
                            GenerationSettings(max_new_tokens=12, temperature=1.0), 1)
        assert done["text"] == direct.text  # this column's model, not another's
        expected = models.judge.score(QUESTION, done["text"])
        assert done["judge"] == "tiny/reward@1" and done["score"] == pytest.approx(expected, abs=1e-3)
    a, b = (models.policy(ref).model for ref in ("tiny/a", "tiny/b"))
    assert a is not b and not torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert len(models._loaded) == 2
    _answer(client, "tiny/a@1")  # the same entry by its full ref: the weights already loaded
    assert len(models._loaded) == 2


def test_a_seed_makes_a_sampled_answer_reproducible(client):
    settings = {"top_k": 50}
    first, second, other = (_answer(client, "tiny/a", settings=settings, seed=s)[-1]["text"] for s in (7, 7, 8))
    assert first == second and first != other


def test_stop_ends_an_answer_early_and_says_so(client, models):
    policy = models.policy("tiny/a")
    original = policy.model.forward
    calls = threading.Event()

    def slow_forward(*args, **kwargs):  # slow enough that the stop arrives mid-answer
        calls.set()
        threading.Event().wait(0.05)
        return original(*args, **kwargs)

    policy.model.forward = slow_forward
    try:
        def press_stop():
            calls.wait(10)
            threading.Event().wait(0.2)
            assert client.post("/api/stop", json={"ids": ["long"]}).json() == {"stopped": ["long"]}

        presser = threading.Thread(target=press_stop)
        presser.start()
        with client.stream("POST", "/api/answer", json={"id": "long", "ref": "tiny/a", "messages": QUESTION,
                                                        "settings": {"max_new_tokens": 200}}) as resp:
            events = [json.loads(line) for line in resp.iter_lines() if line.strip()]
        presser.join()
    finally:
        policy.model.forward = original
    done = events[-1]
    assert done["stopped"] is True and 0 < done["tokens"] < 200 and not done["ended_with_eos"]


def test_bad_answer_requests_are_refused_with_the_reason(client):
    for body, expected in [({"ref": "nope/none"}, "nope/none"), ({"ref": "tiny/reward"}, "reward model"),
                           ({"ref": "tiny/a", "settings": {"temperature": -1}}, "temperature"),
                           ({"ref": "tiny/a", "settings": {"beam_width": 2}}, "beam_width"),
                           ({"ref": "tiny/a", "messages": [{"role": "assistant", "content": "hi"}]}, "user")]:
        resp = client.post("/api/answer", json={"id": "x", "messages": QUESTION, **body})
        assert resp.status_code == 400 and expected in resp.json()["error"], (body, resp.json())


def test_a_pick_is_a_preference_row_the_reward_stage_reads_and_a_tie_is_kept_apart(client, tmp_path):
    a = {"ref": "tiny/a@1", "text": "5", "settings": {"temperature": 0}}
    b = {"ref": "tiny/b@1", "text": "2 + 3 = 6", "settings": {"temperature": 0}}
    counts = client.post("/api/preference", json={"prompt": QUESTION, "answers": [a, b], "verdict": "b"}).json()
    assert counts["rows"] == 1 and counts["ties"] == 0
    counts = client.post("/api/preference", json={"prompt": QUESTION, "answers": [a, b], "verdict": "tie"}).json()
    assert counts["rows"] == 1 and counts["ties"] == 1
    rows = [json.loads(line) for line in (tmp_path / "prefs.jsonl").read_text().splitlines()]
    assert rows[0]["chosen"] == "2 + 3 = 6" and rows[0]["rejected"] == "5"
    assert rows[0]["chosen_ref"] == "tiny/b@1" and rows[0]["rejected_ref"] == "tiny/a@1"
    pairs = load_pairs(rows, "prefs.jsonl")
    assert not pairs.problems and pairs.format == "explicit"
    assert pairs.pairs[0].prompt == QUESTION and pairs.pairs[0].chosen[0]["content"] == "2 + 3 = 6"
    ties = [json.loads(line) for line in (tmp_path / "prefs.ties.jsonl").read_text().splitlines()]
    assert ties[0]["responses"] == ["5", "2 + 3 = 6"]
    bad = client.post("/api/preference", json={"prompt": QUESTION, "answers": [a, {**b, "text": " "}],
                                               "verdict": "a"})
    assert bad.status_code == 400 and "non-empty" in bad.json()["error"]


# ------------------------------------------------------------------------------------------ the command


def _playground(tmp_path, registry, *args) -> int:
    from align.cli.main import main

    return main(["--registry", str(registry.root), "playground", "--prefs", str(tmp_path / "p.jsonl"), *args])


def test_the_command_refuses_bad_refs_a_wrong_judge_and_a_busy_port_before_loading(registry, tmp_path, capsys,
                                                                                   monkeypatch):
    import align.models.loading as loading

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the arguments were checked")

    monkeypatch.setattr(loading, "load_causal_lm", no_loading)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        cases = [(["nope/none"], "nope/none"), (["tiny/reward"], "reward model"),
                 (["tiny/a", "--judge", "tiny/b"], "--rubric"),
                 (["tiny/a", "--judge", "tiny/reward", "--rubric", "Helpful?"], "drop --rubric"),
                 (["tiny/a", "--port", str(port)], f"--port {port}"),
                 (["tiny/a", "--temperature", "-2"], "--temperature"),
                 (["tiny/a"] * 5, "at most 4")]
        for args, expected in cases:
            assert _playground(tmp_path, registry, *args) != 0, args
            err = capsys.readouterr().err
            assert expected in err and "Traceback" not in err, (args, err)
    finally:
        busy.close()


def test_without_its_extra_the_command_says_what_to_install(registry, tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def without_uvicorn(name, *args, **kwargs):
        if name == "uvicorn":
            raise ImportError("No module named 'uvicorn'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_uvicorn)
    assert _playground(tmp_path, registry, "tiny/a") != 0
    assert 'pip install "align[playground]"' in capsys.readouterr().err


def test_a_judge_that_is_no_model_at_all_is_named(registry):
    with pytest.raises(AlignError, match="nope/judge"):
        load_judge("nope/judge", registry)
