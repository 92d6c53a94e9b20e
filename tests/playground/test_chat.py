"""`align chat` driven through stdin: it streams the same answer `generate` gives, keeps the conversation
(the second turn's prompt holds the first exchange), forgets it on /reset, exits cleanly on /exit and on
end of input, and with --compare answers with both models, labelled."""

from __future__ import annotations

import io

import pytest
import torch

from align.playground.chat import ChatModel, chat_loop
from align.cli.main import main
from align.data.tokenize import encode_prompt
from align.models.generation import generate
from align.config.schema import GenerationSettings

SETTINGS = GenerationSettings(max_new_tokens=6)


@pytest.fixture(scope="module")
def model(tiny_base):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    with torch.no_grad():  # larger weights than the init's: answers that differ from prompt to prompt
        torch.manual_seed(0)
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.15)
    return model


def run(chats, text: str) -> tuple[int, str]:
    out = io.StringIO()
    code = chat_loop(chats, SETTINGS, stdin=io.StringIO(text), stdout=out)
    return code, out.getvalue()


def expected_answer(model, tokenizer, messages) -> str:
    return generate(model, tokenizer, [encode_prompt(tokenizer, messages)], SETTINGS)[0].text


def test_chat_streams_the_answer_and_keeps_the_conversation(model, chatml_tokenizer):
    chat = ChatModel("tiny", model, chatml_tokenizer)
    code, out = run([chat], "What is 3 + 4?\nAnd 5 + 6?\n/exit\nnot read\n")
    first = expected_answer(model, chatml_tokenizer, [{"role": "user", "content": "What is 3 + 4?"}])
    history = [{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "And 5 + 6?"}]
    second = expected_answer(model, chatml_tokenizer, history)
    assert code == 0
    assert f"you> What is 3 + 4?\ntiny> {first}\n" in out
    assert f"you> And 5 + 6?\ntiny> {second}\n" in out
    assert "not read" not in out
    assert chat.messages == history + [{"role": "assistant", "content": second}]


def test_reset_forgets_and_end_of_input_exits_cleanly(model, chatml_tokenizer):
    chat = ChatModel("tiny", model, chatml_tokenizer, system="Be brief.")
    code, out = run([chat], "Hello there\n/reset\n/nonsense\n\nAnd 5 + 6?\n")  # no /exit: stdin just ends
    assert code == 0
    assert "(conversation reset)" in out and "unknown command /nonsense" in out
    # after the reset only the system prompt and the new exchange remain
    assert [m["content"] for m in chat.messages][:2] == ["Be brief.", "And 5 + 6?"] and len(chat.messages) == 3
    fresh = expected_answer(model, chatml_tokenizer, [{"role": "system", "content": "Be brief."},
                                                      {"role": "user", "content": "And 5 + 6?"}])
    assert f"tiny> {fresh}\n" in out


def test_compare_answers_with_both_models_labelled(model, chatml_tokenizer, tiny_base):
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    code, out = run([ChatModel("a", model, chatml_tokenizer), ChatModel("b", other, chatml_tokenizer)],
                    "Hello there\n/exit\n")
    message = [{"role": "user", "content": "Hello there"}]
    assert code == 0
    assert f"[a] {expected_answer(model, chatml_tokenizer, message)}\n" in out
    assert f"[b] {expected_answer(other, chatml_tokenizer, message)}\n" in out
    assert out.index("[a] ") < out.index("[b] ")


def test_an_old_turn_is_dropped_when_the_context_is_full(model, chatml_tokenizer):
    from align.playground.chat import prompt_within_context

    chat = ChatModel("tiny", model, chatml_tokenizer, system="sys")
    chat.messages += [{"role": "user", "content": "one " * 20}, {"role": "assistant", "content": "two " * 20},
                      {"role": "user", "content": "three"}]
    ids = prompt_within_context(chat, room=30)
    assert [m["content"] for m in chat.messages] == ["sys", "three"] and len(ids) <= 30


def test_align_chat_command_reads_stdin(tiny_base, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 3 + 4?\n"))
    code = main(["--registry", str(tmp_path / "reg"), "chat", str(tiny_base), "--max-new-tokens", "4",
                 "--presence-penalty", "0.5"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith("chatting with ") and f"{tiny_base}> " in out
    assert main(["--registry", str(tmp_path / "reg"), "chat", str(tiny_base), "--top-p", "2"]) == 2
    assert "--top-p" in capsys.readouterr().err
