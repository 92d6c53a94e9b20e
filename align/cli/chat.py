"""`align chat`: the terminal playground, with an optional second model answering too."""

from __future__ import annotations

from align.cli.common import generation_flags, generation_overrides, registry_of


def cmd_chat(args) -> int:
    from align.playground.chat import ChatModel, chat_loop
    from align.models.generation import settings_with
    from align.models.loading import load_causal_lm, load_tokenizer, materialize, resolve_model_ref
    from align.config.schema import GenerationSettings
    from align.pipeline.eval_entry import refuse_reward_entry

    registry = registry_of(args)
    settings = settings_with(GenerationSettings(max_new_tokens=256), generation_overrides(args))
    refs = [args.ref] + ([args.compare] if args.compare else [])
    sources = [materialize(resolve_model_ref(ref, registry), registry) for ref in refs]  # all refs checked first
    for ref, source in zip(refs, sources):
        refuse_reward_entry(ref, source)
    chats = []
    for ref, source in zip(refs, sources):
        model = load_causal_lm(source, registry, dtype=args.dtype)
        model.eval()
        chats.append(ChatModel(label=source.entry.ref if source.entry else ref, model=model,
                               tokenizer=load_tokenizer(source, registry), system=args.system))
    return chat_loop(chats, settings)


def add_chat(sub) -> None:
    """`align chat`'s arguments."""
    p = sub.add_parser("chat", help="chat with a model in the terminal (streams; /reset, /exit)")
    p.add_argument("ref", nargs="?", default="smollm2-135m-instruct", help="registry ref, local folder or hub id "
                   "(default: smollm2-135m-instruct)")
    p.add_argument("--compare", metavar="REF", help="a second model answers every message too")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    generation_flags(p, "256")
    p.set_defaults(fn=cmd_chat)
