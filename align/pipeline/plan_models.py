"""The plan's model checks: refs resolved without loading weights, entries' files whole, each stage's parent,
chat templates along the chain, and PPO's reward sources."""

from __future__ import annotations

import difflib
from pathlib import Path

from align.config.recipe import broken_keys
from align.errors import AlignError, Problem
from align.models.loading import ModelSource, resolve_model_ref
from align.registry.store import Registry
from align.rewards.arguments import checker_problems, function_problems
from align.rewards.judge import judge_args_problem
from align.stages import stage_class


def local_folder(source: ModelSource | None, registry: Registry) -> tuple[Path | None, Path | None]:
    """(folder with config.json, folder with the tokenizer) of a source that is on disk, without pulling or
    downloading anything; adapter entries lead to the full weights they apply to."""
    from align.models.loading import adapter_parent

    if source is None:
        return None, None
    if source.entry is not None:
        entry, tokenizer = source.entry, None
        if entry.manifest.get("tokenizer", {}).get("path"):
            tokenizer = entry.file(entry.manifest["tokenizer"]["path"])
        for _ in range(8):  # adapter on adapter ... on full weights
            if entry.artifact.get("type") != "adapter":
                return entry.file(entry.artifact["path"]), tokenizer
            try:
                parent = adapter_parent(entry, registry)
            except AlignError:
                return None, tokenizer
            if parent.entry is None:
                return (Path(parent.path) if parent.kind == "local" else None), tokenizer
            entry = parent.entry
        return None, tokenizer
    if source.kind == "local":
        return Path(source.path), Path(source.path)
    return None, None


def tokenizer_in_folder(folder: Path | None):
    """The tokenizer in `folder` (a few hundred ms, no weights), or None where there is none to read."""
    if folder is None or not folder.is_dir():
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError, TypeError):  # unreadable: the stage reports it when it loads it
        return None


def _parent_template(folder: Path | None, read: dict) -> str | None:
    """The chat template of the tokenizer in `folder`, read once per plan (`read` caches it)."""
    key = str(folder)
    if key not in read:
        tokenizer = tokenizer_in_folder(folder)
        read[key] = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    return read[key]


def check_template(recipe, name, cfg, parent_source, templates, read, registry, problems) -> None:
    """A stage after SFT must use its parent's chat template (as `align.stages.base.stage_tokenizer` checks when
    it runs): refused here already when the parent is on disk or an earlier stage of this recipe."""
    from align.registry.fingerprint import short_hash
    from align.stages.building import read_chat_template

    own = None
    if cfg.chat_template is not None:
        try:
            own = read_chat_template(cfg.chat_template, recipe)
        except AlignError:
            return  # named by the chat_template file check
    parent_template, parent_name = None, None
    if parent_source is None:  # an earlier stage of this recipe: its template, or what it inherited
        earlier = cfg.from_ if cfg.from_ not in (None, "base") else None
        if earlier is None:
            sft = [n for n in templates if stage_class(recipe.stages[n].kind).default_parent]
            earlier = sft[-1] if sft else None
        earlier = earlier[1:] if earlier and earlier.startswith("@") else earlier
        if earlier not in templates:
            templates[name] = own
            return
        parent_template, parent_name = templates[earlier], f"stage {earlier}"
    else:
        parent_template = _parent_template(local_folder(parent_source, registry)[1], read)
        parent_name = parent_source.describe()
    templates[name] = own if own is not None else parent_template
    if (stage_class(cfg.kind).may_set_chat_template or own is None or parent_template is None
            or own == parent_template):
        return
    message = (f"the chat template this stage sets ({short_hash(own.encode())}) differs from its parent's "
               f"({short_hash(parent_template.encode())}, {parent_name})")
    if not cfg.allow_template_mismatch:
        problems.append(Problem(f"stages.{name}.chat_template", message + "; use the parent's template, or set "
                                "allow_template_mismatch: true"))


def resolve_ref(ref: str, where: str, registry: Registry, problems: list[Problem], check_hub: bool, recipe=None):
    """The source `ref` names, or None with the reason in `problems`; a ref close to one of `recipe`'s own
    stage names is told so (the registry's hints name only entries that exist)."""
    try:
        source = resolve_model_ref(ref, registry, check_hub=check_hub)
    except AlignError as err:
        problems.append(Problem(where, str(err) + (_stage_hint(ref, recipe) if recipe is not None else "")))
        return None
    _check_files(source, where, registry, problems)
    return source


def _stage_hint(ref: str, recipe) -> str:
    """` (did you mean "sft", a stage of this recipe?)` for a ref that is a near miss of a stage name or
    `base`; "" otherwise."""
    choices = [*recipe.stages, *sorted(broken_keys(recipe, "stages")), "base"]
    close = difflib.get_close_matches(ref[1:] if ref.startswith("@") else ref, choices, n=2)
    if not close:
        return ""
    named = " or ".join(f'"{c}"' for c in close)
    return f" (did you mean {named}, {'the recipe base' if close == ['base'] else 'a stage of this recipe'}?)"


def _check_files(source: ModelSource, where: str, registry: Registry, problems: list[Problem]) -> None:
    """A registry entry whose files are damaged (`align.registry.integrity`: sizes and headers, no weights read) is
    named now, entry and file, rather than crashing the run that loads it."""
    from align.registry.integrity import source_problems

    if source.entry is not None:
        problems += [Problem(where, f"damaged entry {p}") for p in source_problems(source, registry)]


def stage_parent(recipe, name, index, cfg, selected, base, registry, problems, check_hub):
    names = list(recipe.stages)
    ref = cfg.from_
    if ref is None:  # default: the latest earlier SFT stage, else the base
        earlier_sft = [n for n in names[:index] if stage_class(recipe.stages[n].kind).default_parent]
        ref = earlier_sft[-1] if earlier_sft else "base"
    if ref == "base":
        return f"base {recipe.base}", base
    stage_name = ref[1:] if ref.startswith("@") else ref
    if stage_name in broken_keys(recipe, "stages"):  # a stage too broken to plan: its own problems say why
        return f"stage:{stage_name}", None
    if stage_name in recipe.stages:
        if names.index(stage_name) >= index:
            problems.append(Problem(f"stages.{name}.from", f"stage {stage_name!r} runs after {name!r}"))
            return ref, None
        if stage_name in selected:
            return f"stage:{stage_name}", None
        existing = registry.find(f"{recipe.name}/{stage_name}")
        if existing is None:
            problems.append(Problem(f"stages.{name}.from", f"stage {stage_name!r} is not selected to run and "
                                    f"the registry has no {recipe.name}/{stage_name} yet; run it first"))
            return ref, None
        source = ModelSource(ref=existing.ref, kind="registry", entry=existing)
        _check_files(source, f"stages.{name}.from", registry, problems)
        return existing.ref, source
    source = resolve_ref(ref, f"stages.{name}.from", registry, problems, check_hub, recipe)
    return ref, source


def check_reward_sources(recipe, name, index, cfg, selected, registry, problems, check_hub) -> list[str]:
    """Each PPO reward source: a known checker or user code that loads and takes its args, an earlier reward
    stage, or a reward entry that passed its gate."""
    from align.rewards.scoring import gate_problem, reward_problem

    names, notes = list(recipe.stages), []
    for i, source in enumerate(cfg.rewards):
        where = f"stages.{name}.rewards[{i}]"
        if source.checker is not None:  # a built-in, or user code (`module:function`, `file.py:function`)
            problems += checker_problems(source.checker, source.args, f"{where}.checker", f"{where}.args",
                                         recipe.resolve_path)
            continue
        if getattr(source, "function", None) is not None:  # a batch reward function of user code
            problems += function_problems(source.function, source.args, f"{where}.function", f"{where}.args",
                                          recipe.resolve_path)
            continue
        if getattr(source, "judge", None) is not None:  # a causal LM answering the rubric
            notes += check_judge(recipe, source.judge, source.judge_score, where, registry, problems, check_hub,
                                 stage=name, index=index, selected=selected)
            why = judge_args_problem(source.args)
            if why:
                problems.append(Problem(f"{where}.args", why))
            continue
        ref = source.model[1:] if source.model.startswith("@") else source.model
        if ref in broken_keys(recipe, "stages"):  # a stage too broken to plan: its own problems say why
            continue
        hint = recipe
        if ref in recipe.stages:
            hint = None
            if not is_reward_stage(recipe.stages[ref]):
                problems.append(Problem(f"{where}.model", f"stage {ref!r} is a {recipe.stages[ref].kind} stage, "
                                        "not a reward model"))
                continue
            if names.index(ref) >= index:
                problems.append(Problem(f"{where}.model", f"reward stage {ref!r} runs after {name!r}"))
                continue
            if ref in selected:
                notes.append(f"reward: output of stage {ref} (its quality gate is checked when {name} starts)")
                continue
            existing = registry.find(f"{recipe.name}/{ref}")
            if existing is None:
                problems.append(Problem(f"{where}.model", f"stage {ref!r} is not selected to run and the registry "
                                        f"has no {recipe.name}/{ref} yet; run it first"))
                continue
            ref = existing.ref
        source_model = resolve_ref(ref, f"{where}.model", registry, problems, check_hub, hint)
        if source_model is None:
            continue
        why = reward_problem(source_model)
        if why is None and not cfg.allow_failed_gate:
            why = gate_problem(source_model)
        if why:
            problems.append(Problem(f"{where}.model", why))
        else:
            notes.append(f"reward: {source_model.describe()} (weight {source.weight})")
    return notes


def check_judge(recipe, ref, mode, where, registry, problems, check_hub, *, stage=None, index=None, selected=(),
                instead="use `model:` instead of `judge:`") -> list[str]:
    """A generative judge's model (`where.judge`): `base`, a policy stage of this recipe (for PPO, one that runs
    before `stage`; for the eval hook, skipped until it has an entry) or a causal-LM ref, and, where its
    tokenizer is on disk, one that can give `mode`'s verdict (`where.judge_score`). Notes say what judges."""
    from align.rewards.judge import judge_problem, tokenizer_problem

    name = ref.removeprefix("@")
    if name in broken_keys(recipe, "stages") or (name == "base" and "base" in broken_keys(recipe)):
        return []  # its own problems say why
    if name == "base":
        ref = recipe.base
    elif name in recipe.stages:
        if is_reward_stage(recipe.stages[name]):
            problems.append(Problem(f"{where}.judge", f"stage {name!r} is a reward stage, not a causal LM; "
                                    f"{instead}"))
            return []
        if index is not None and list(recipe.stages).index(name) >= index:
            problems.append(Problem(f"{where}.judge", f"stage {name!r} runs after {stage!r}"))
            return []
        existing = registry.find(f"{recipe.name}/{name}")
        if name in selected or (existing is None and index is None):
            return [f"judge: output of stage {name} ({mode})"]
        if existing is None:
            problems.append(Problem(f"{where}.judge", f"stage {name!r} is not selected to run and the registry "
                                    f"has no {recipe.name}/{name} yet; run it first"))
            return []
        ref = existing.ref
    source = resolve_ref(ref, f"{where}.judge", registry, problems, check_hub, recipe)
    why = judge_problem(source, instead) if source is not None else None
    if source is None or why:
        problems += [Problem(f"{where}.judge", why)] if why else []
        return []
    tokenizer = tokenizer_in_folder(local_folder(source, registry)[1])
    why = tokenizer_problem(tokenizer, mode) if tokenizer is not None else None
    if why:
        problems.append(Problem(f"{where}.judge_score", why))
    notes = [f"judge: {source.describe()} ({mode})"]
    if tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        notes.append(f"judge {ref} has no chat template: it reads the rubric question as plain text ending in "
                     "'Answer:'")
    return notes


def is_reward_stage(cfg) -> bool:
    """Whether the stage registers a reward model (`Stage.entry_kind`)."""
    return stage_class(cfg.kind).entry_kind == "reward"
