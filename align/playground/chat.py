"""`align chat`: a terminal playground for registry entries (or any model ref).

The conversation is kept as chat messages and rendered with the model's own chat template every turn, so
what the model sees is what the stages trained on. Tokens stream as they are generated (transformers'
`TextStreamer`; beam search cannot stream, so its answer prints when done). `--compare` sends each
message to a second model too, which keeps its own conversation; the answers stream one after the other,
labelled. Commands: `/reset` clears the conversation (a `--system` prompt stays), `/exit` or end of input
(Ctrl-D, or the end of piped stdin) leaves with status 0.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from align.data.tokenize import encode_prompt
from align.models.generation import generate

HELP = "/reset clears the conversation, /exit (or Ctrl-D) leaves"


@dataclass
class ChatModel:
    label: str
    model: object
    tokenizer: object
    system: str | None = None
    messages: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []


def streamer(tokenizer, out):
    """A `TextStreamer` that writes the response's text (prompt and special tokens skipped) to `out`."""
    from transformers import TextStreamer

    class Printer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            out.write(text)
            if stream_end:
                out.write("\n")
            out.flush()

    return Printer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def fit_context(tokenizer, messages: list[dict], room: int) -> list[int]:
    """The prompt ids of the conversation `messages`; its oldest turns (after a system prompt) are deleted
    from the list while it is longer than `room` tokens, keeping at least the last user message."""
    while True:
        ids = encode_prompt(tokenizer, messages)
        first = 1 if messages and messages[0]["role"] == "system" else 0
        if len(ids) <= room or len(messages) - first <= 1:
            return ids
        del messages[first: first + 2]  # one user turn and its answer


def room_for_prompt(model, settings) -> int:
    """How many prompt tokens leave room for `settings.max_new_tokens` in the model's context."""
    return getattr(model.config, "max_position_embeddings", 1 << 30) - settings.max_new_tokens


def prompt_within_context(chat: ChatModel, room: int) -> list[int]:
    """The prompt ids of the chat's conversation, its oldest turns dropped to fit `room` (`fit_context`)."""
    return fit_context(chat.tokenizer, chat.messages, room)


def answer(chat: ChatModel, settings, out) -> str:
    """Generate the reply to the conversation so far, streaming it to `out`, and add it to the conversation."""
    ids = prompt_within_context(chat, room_for_prompt(chat.model, settings))
    if settings.num_beams > 1:
        [reply] = generate(chat.model, chat.tokenizer, [ids], settings, 1)
        out.write(reply.text + "\n")
        out.flush()
    else:
        [reply] = generate(chat.model, chat.tokenizer, [ids], settings, 1, streamer=streamer(chat.tokenizer, out))
    chat.messages.append({"role": "assistant", "content": reply.text})
    return reply.text


def _read(stdin, stdout, interactive: bool) -> str | None:
    if interactive:
        try:
            return input("you> ")
        except EOFError:
            stdout.write("\n")
            return None
    line = stdin.readline()
    if not line:
        return None
    stdout.write(f"you> {line.rstrip()}\n")  # piped input: echo it so the transcript reads as a conversation
    return line


def chat_loop(chats: list[ChatModel], settings, stdin=None, stdout=None) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    interactive = stdin is sys.stdin and stdin.isatty()
    names = " and ".join(c.label for c in chats)
    stdout.write(f"chatting with {names}; {HELP}\n")
    stdout.flush()
    while True:
        line = _read(stdin, stdout, interactive)
        if line is None:
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            for chat in chats:
                chat.reset()
            stdout.write("(conversation reset)\n")
            continue
        if text.startswith("/"):
            stdout.write(f"unknown command {text.split()[0]}; {HELP}\n")
            continue
        for chat in chats:
            chat.messages.append({"role": "user", "content": text})
            stdout.write(f"[{chat.label}] " if len(chats) > 1 else f"{chat.label}> ")
            stdout.flush()
            answer(chat, settings, stdout)
