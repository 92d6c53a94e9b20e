"""The dry run: validate a whole pipeline, resolve every model ref and data file, load no weights.

`make_plan` collects every problem of every stage into one `ConfigError`, so a user fixes a recipe in
one pass. Stage parents are either earlier stages of the same recipe (their output does not exist yet,
which is fine) or model refs (which must resolve now).
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from align.data.formats import load_conversations
from align.data.io import check_source, is_hub_dataset, read_rows, spec_options
from align.data.preference import load_pairs
from align.data.prompts import prompt_problems
from align.data.prepare import (DataReport, apply_pair_policy, apply_row_policy, dropped_share_problem,
                                pair_problems_for_plan, problems_for_plan)
from align.errors import AlignError, ConfigError, Problem
from align.eval.hook import METRICS
from align.models.loading import ModelSource, four_bit_problem, resolve_model_ref
from align.config.recipe import broken_keys
from align.registry.store import Registry
from align.rewards.arguments import argument_value_problems
from align.rewards.checkers import CHECKERS, fields_needed

log = logging.getLogger(__name__)

IMPLEMENTED = {"sft", "reward", "dpo", "ppo"}


@dataclass
class StagePlan:
    name: str
    kind: str
    parent: str  # "stage:<name>" for an earlier stage of this recipe, else the resolved ref
    parent_source: ModelSource | None
    output: str
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class Plan:
    recipe: object
    registry: Registry
    base: ModelSource | None
    stages: list[StagePlan]

    def describe(self) -> str:
        from align.runtime.precision import device_facts

        lines = [f"recipe {self.recipe.name} ({self.recipe.source})", f"registry {self.registry.root}",
                 f"base: {self.base.describe() if self.base else '?'}", f"device: {device_facts().describe()}"]
        for i, stage in enumerate(self.stages, start=1):
            parent = stage.parent.replace("stage:", "output of stage ")
            lines.append(f"{i}. {stage.name} [{stage.kind}] from {parent} -> {stage.output}@next")
            lines += [f"     {note}" for note in stage.notes]
            lines += [f"     warning: {warning}" for warning in stage.warnings]
        return "\n".join(lines)

    def warnings(self) -> list[str]:
        return [f"stages.{stage.name}: {w}" for stage in self.stages for w in stage.warnings]


def make_plan(recipe, registry: Registry | None = None, only: list[str] | None = None,
              check_hub: bool = True) -> Plan:
    """Check every stage's parent, files, refs and data (no weights load); one `ConfigError` with every problem.
    A partial recipe (`ConfigError.partial`) is checked too: a check that reads a key that failed validation
    is skipped (`broken_keys`), every other one runs."""
    if registry is None:
        registry = Registry(recipe.registry) if recipe.registry else Registry()
    problems: list[Problem] = []
    base = None if "base" in broken_keys(recipe) else _resolve(recipe.base, "base", registry, problems, check_hub)
    names = list(recipe.stages)
    unbuilt = broken_keys(recipe, "stages")
    for name in only or []:
        if name not in recipe.stages and name not in unbuilt:
            problems.append(Problem(f"--stage {name}", f"no such stage; the recipe has {', '.join(names)}"))
    selected = [n for n in names if not only or n in only]
    plans = []
    templates: dict[str, str | None] = {}  # each stage's chat template, for the stages that follow it
    read: dict[str, str | None] = {}  # chat templates of tokenizer folders, read once
    for index, name in enumerate(names):
        cfg = recipe.stages[name]
        where = f"stages.{name}"
        bad = broken_keys(recipe, where)
        if "from" in bad:
            parent, parent_source = "(from: not valid)", None
        else:
            parent, parent_source = _parent(recipe, name, index, cfg, selected, base, registry, problems, check_hub)
        if name not in selected:
            continue
        stage = StagePlan(name=name, kind=cfg.kind, parent=parent, parent_source=parent_source,
                          output=f"{recipe.name}/{name}")
        problems += _setting_problems(recipe, cfg, where, bad)
        if cfg.kind == "ppo" and not bad & {"rewards", "allow_failed_gate"}:
            stage.notes += _check_reward_sources(recipe, name, index, cfg, selected, registry, problems, check_hub)
        for key in ("data", "eval_data", "prompts", "eval_prompts"):
            spec = getattr(cfg, key, None) if key not in bad else None
            if spec is not None:
                stage.notes += _check_data(recipe, spec, f"{where}.{key}", cfg, problems, bad)
        if not bad & {"from", "chat_template", "allow_template_mismatch"}:
            _check_template(recipe, name, cfg, parent_source, templates, read, registry, problems)
        if not bad:  # notes only; a stage with broken keys fails the plan anyway
            machine_notes, machine_warnings = _machine_notes(cfg)
            stage.notes += machine_notes
            stage.warnings += machine_warnings
            stage.notes += _memory_note(recipe, cfg, parent_source or base, registry)
        plans.append(stage)
    if "eval" not in broken_keys(recipe):
        _check_eval(recipe, problems, broken_keys(recipe, "eval"))
        _check_eval_models(recipe, registry, problems, check_hub, broken_keys(recipe, "eval"))
    if problems:
        raise ConfigError(problems, recipe.source)
    return Plan(recipe=recipe, registry=registry, base=base, stages=plans)


def add_plan_problems(err: ConfigError, registry: Registry | None = None, only: list[str] | None = None,
                      check_hub: bool = True) -> ConfigError:
    """`err` (a recipe's schema and cross-field problems) with the plan's problems of the same recipe added,
    from the recipe as far as it validated (`err.partial`): files, refs and data of every stage in the same
    report, instead of only once the schema is clean."""
    if err.partial is None:
        return err
    try:
        make_plan(err.partial, registry, only, check_hub)
        planned: list[Problem] = []
    except ConfigError as found:
        planned = found.problems
    except Exception:  # noqa: BLE001 - a check that trips over a partial recipe must not hide the schema report
        log.debug("planning the partial recipe failed", exc_info=True)
        planned = []
    return ConfigError(list(dict.fromkeys([*err.problems, *planned])), err.source)


def _setting_problems(recipe, cfg, where: str, bad: set[str]) -> list[Problem]:
    """A stage's settings this version or machine cannot honour (kind, qlora, flash attention, template file)."""
    problems = []
    if cfg.kind not in IMPLEMENTED:
        problems.append(Problem(where, f"stage kind {cfg.kind!r} is not implemented in this version of align"))
    if cfg.method == "qlora" and "method" not in bad:
        why = four_bit_problem()
        if why:
            problems.append(Problem(f"{where}.method", f"qlora needs 4-bit support: {why}"))
    if cfg.attention.startswith("flash_attention") and "attention" not in bad:
        why = flash_attention_problem(cfg.attention)
        if why:
            problems.append(Problem(f"{where}.attention", why))
    template = cfg.chat_template
    if template is not None and "{{" not in template and "{%" not in template and "chat_template" not in bad:
        if not recipe.resolve_path(template).is_file():
            problems.append(Problem(f"{where}.chat_template", f"{template}: neither a template nor a readable file"))
    return problems


# ------------------------------------------------------------------------------------------ tokenizers, memory


def _local_folder(source: ModelSource | None, registry: Registry) -> tuple[Path | None, Path | None]:
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


def _load_tokenizer(folder: Path | None):
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
        tokenizer = _load_tokenizer(folder)
        read[key] = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    return read[key]


def _check_template(recipe, name, cfg, parent_source, templates, read, registry, problems) -> None:
    """A stage after SFT must use its parent's chat template (as `align.stages.base.stage_tokenizer` checks when
    it runs): refused here already when the parent is on disk or an earlier stage of this recipe."""
    from align.registry.fingerprint import short_hash
    from align.stages.base import read_chat_template

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
            sft = [n for n in templates if recipe.stages[n].kind == "sft"]
            earlier = sft[-1] if sft else None
        earlier = earlier[1:] if earlier and earlier.startswith("@") else earlier
        if earlier not in templates:
            templates[name] = own
            return
        parent_template, parent_name = templates[earlier], f"stage {earlier}"
    else:
        parent_template = _parent_template(_local_folder(parent_source, registry)[1], read)
        parent_name = parent_source.describe()
    templates[name] = own if own is not None else parent_template
    if cfg.kind == "sft" or own is None or parent_template is None or own == parent_template:
        return
    message = (f"the chat template this stage sets ({short_hash(own.encode())}) differs from its parent's "
               f"({short_hash(parent_template.encode())}, {parent_name})")
    if not cfg.allow_template_mismatch:
        problems.append(Problem(f"stages.{name}.chat_template", message + "; use the parent's template, or set "
                                "allow_template_mismatch: true"))


def _machine_notes(cfg) -> tuple[list[str], list[str]]:
    """What this machine makes of the stage's precision, attention and threads, each with its reason, and
    warnings for explicit settings the hardware makes slow (`align.runtime.precision`)."""
    from align.runtime.precision import device_facts, stage_precision

    precision = stage_precision(cfg)
    device = device_facts()
    attention = ("attention: sdpa (transformers' default)" if cfg.attention == "auto"
                 else f"attention: {cfg.attention} (set in the recipe)")
    notes = [f"precision: {precision.describe()}", attention]
    if device.kind == "cpu":
        notes.append(f"threads: {device.threads} (torch's default: one per core; OMP_NUM_THREADS changes it)")
    warnings = list(precision.warnings)
    if cfg.method == "qlora" and device.kind == "cpu":
        warnings.append("qlora on a CPU runs bitsandbytes' CPU kernels: about 11x the time of lora for about 8% "
                        "less memory on SmolLM2-135M; use method: lora unless memory forces 4-bit")
    return notes, warnings


def _memory_note(recipe, cfg, source: ModelSource | None, registry: Registry) -> list[str]:
    """The stage's estimated peak memory (`align.pipeline.memory`) from the model's config.json, with the longest row
    of an SFT stage's data when the tokenizer is on disk."""
    from align.pipeline.memory import Shape, estimate_stage

    config_dir, tokenizer_dir = _local_folder(source, registry)
    if config_dir is None or not (config_dir / "config.json").is_file():
        return ["memory: no estimate (the model's config.json is not on disk yet)"]
    try:
        shape = Shape.from_file(config_dir / "config.json")
    except (KeyError, ValueError, OSError) as err:
        return [f"memory: no estimate (config.json: {err})"]
    seq_len = _longest_sft_row(recipe, cfg, _load_tokenizer(tokenizer_dir)) if cfg.kind == "sft" else None
    return ["memory: " + estimate_stage(shape, cfg, seq_len=seq_len).describe()]


def _longest_sft_row(recipe, cfg, tokenizer, limit: int = 5000) -> int | None:
    """Tokens in the longest of the first `limit` training conversations (capped at max_length)."""
    from align.data.tokenize import encode_conversation

    if tokenizer is None or is_hub_dataset(cfg.data.path):
        return None
    try:
        rows = read_rows(recipe.resolve_path(cfg.data.path), **{**spec_options(cfg.data), "limit": cfg.data.limit or limit})
        conversations = load_conversations(rows[:limit], cfg.data.format, str(cfg.data.path))
        if cfg.chat_template is not None:
            from align.stages.base import read_chat_template

            tokenizer.chat_template = read_chat_template(cfg.chat_template, recipe)
        return max(len(encode_conversation(tokenizer, c, cfg.max_length).input_ids) for c in conversations.rows)
    except (AlignError, OSError, ValueError, KeyError, TypeError):  # bad data is named by the data checks;
        return None  # the estimate then takes max_length


def _resolve(ref: str, where: str, registry: Registry, problems: list[Problem], check_hub: bool, recipe=None):
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


def _parent(recipe, name, index, cfg, selected, base, registry, problems, check_hub):
    names = list(recipe.stages)
    ref = cfg.from_
    if ref is None:  # default: the latest earlier SFT stage, else the base
        earlier_sft = [n for n in names[:index] if recipe.stages[n].kind == "sft"]
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
    source = _resolve(ref, f"stages.{name}.from", registry, problems, check_hub, recipe)
    return ref, source


def _check_reward_sources(recipe, name, index, cfg, selected, registry, problems, check_hub) -> list[str]:
    """Each PPO reward source: a known checker, an earlier reward stage, or a reward entry that passed its gate."""
    from align.rewards.scoring import gate_problem, reward_problem

    names, notes = list(recipe.stages), []
    for i, source in enumerate(cfg.rewards):
        where = f"stages.{name}.rewards[{i}]"
        if source.checker is not None:
            if source.checker not in CHECKERS:
                problems.append(Problem(f"{where}.checker", f"unknown checker {source.checker!r}; known: "
                                        f"{', '.join(sorted(CHECKERS))}"))
                continue
            why = CHECKERS[source.checker].args_problem(source.args)
            if why:
                problems.append(Problem(f"{where}.args", why))
            else:
                problems += [Problem(f"{where}.args", w) for w in argument_value_problems(CHECKERS[source.checker],
                                                                                         source.args)]
            continue
        ref = source.model[1:] if source.model.startswith("@") else source.model
        if ref in broken_keys(recipe, "stages"):  # a stage too broken to plan: its own problems say why
            continue
        hint = recipe
        if ref in recipe.stages:
            hint = None
            if recipe.stages[ref].kind != "reward":
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
        source_model = _resolve(ref, f"{where}.model", registry, problems, check_hub, hint)
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


def _check_data(recipe, spec, where: str, cfg, problems: list[Problem], bad: set[str] = frozenset()) -> list[str]:
    """File readable, rows in a known format; returns notes for the printed plan. `bad`: the stage's keys that
    failed validation; the row policies that read them (`on_bad_rows`, `max_dropped_share`, `margin_field`,
    the checkers' fields) are left out, the file and format checks still run."""
    policy_ok = not bad & {"on_bad_rows", "max_dropped_share"}
    if is_hub_dataset(spec.path):
        pinned = "".join(f", {key} {getattr(spec, key)}" for key in ("config", "revision") if getattr(spec, key))
        return [f"{where.split('.')[-1]}: hub dataset {spec.path[3:]} (split {spec.split}{pinned}; checked when loaded)"]
    path = recipe.resolve_path(spec.path)
    why = check_source(path)
    if why:
        problems.append(Problem(where, f"{spec.path}: {why}"))
        return []
    try:
        rows = read_rows(path, **spec_options(spec))
    except AlignError as err:
        problems.append(Problem(where, str(err)))
        return []
    if not rows:
        problems.append(Problem(where, f"{spec.path}: no rows"))
        return []
    note = f"{where.split('.')[-1]}: {spec.path} ({len(rows)} rows)"
    if cfg.kind == "sft" and where.endswith(("data", "eval_data")):
        try:
            conversations = load_conversations(rows, spec.format, str(spec.path))
        except AlignError as err:
            problems.append(Problem(where, str(err)))
            return []
        if "on_bad_rows" not in bad:
            problems += problems_for_plan(conversations, cfg.on_bad_rows, where)
        note += f", format {conversations.format}"
        if conversations.problems and cfg.on_bad_rows == "drop" and policy_ok:
            note += f", {len(conversations.problems)} bad rows to drop"
            _check_dropped_share(spec, len(rows), lambda report: apply_row_policy(conversations, report, "drop"),
                                 cfg, where, problems)
    if cfg.kind == "ppo":
        needs = {} if "rewards" in bad else fields_needed(s.checker for s in cfg.rewards if s.checker is not None)
        _prompt_problems(rows, str(spec.path), needs, where, problems)
        note += ", prompts" + (f" checked for {', '.join(sorted(needs))}" if needs else "")
    if cfg.kind in {"reward", "dpo"}:
        try:
            pairs = load_pairs(rows, str(spec.path), None if "margin_field" in bad else cfg.margin_field)
        except AlignError as err:
            problems.append(Problem(where, str(err)))
            return []
        if "on_bad_rows" not in bad:
            problems += pair_problems_for_plan(pairs, cfg.on_bad_rows, where)
        if policy_ok and not (pairs.problems and cfg.on_bad_rows == "error"):  # else refused above, row by row
            _check_dropped_share(spec, len(rows), lambda report: apply_pair_policy(pairs, report, cfg.on_bad_rows),
                                 cfg, where, problems)
        note += f", {pairs.format} preference pairs"
        counts = [f"{len(pairs.problems)} bad" if pairs.problems else "",
                  f"{len(pairs.identical)} identical" if pairs.identical else "",
                  f"{sum(pairs.repaired.values())} repaired" if pairs.repaired else ""]
        if any(counts):
            note += " (" + ", ".join(c for c in counts if c) + ")"
    return [note]


def _check_dropped_share(spec, rows: int, drop, cfg, where: str, problems: list[Problem]) -> None:
    """The stage's `max_dropped_share` on the rows the plan already sees dropped (`drop(report)` counts them as
    the stage does), with the stage's own message, so the plan refuses what the run would refuse. Rows dropped
    only once tokenized (too long for `max_length`) are not seen here and can still add to them."""
    report = DataReport(source=str(spec.path), fingerprint="", rows=rows)
    drop(report)
    why = dropped_share_problem(report, cfg.max_dropped_share)
    if why:
        problems.append(Problem(where, why))


def _check_eval(recipe, problems: list[Problem], bad: set[str] = frozenset()) -> None:
    """The hook's metric and checker names and its prompt file; `bad`: eval keys that failed validation, whose
    checks are left out."""
    settings = recipe.eval
    for i, name in enumerate(settings.metrics if "metrics" not in bad else []):
        if name not in METRICS:
            problems.append(Problem(f"eval.metrics[{i}]", f"unknown metric {name!r}; known: {', '.join(METRICS)}"))
    for i, name in enumerate(settings.checkers if "checkers" not in bad else []):
        if name not in CHECKERS:
            problems.append(Problem(f"eval.checkers[{i}]", f"unknown checker {name!r}; known: {', '.join(sorted(CHECKERS))}"))
    if "prompts" in bad:
        return
    if settings.prompts is None:
        if settings.checkers and "checkers" not in bad:
            problems.append(Problem("eval.checkers", "checkers need `eval.prompts` to generate from"))
        return
    spec = settings.prompts
    if is_hub_dataset(spec.path):
        return
    path = recipe.resolve_path(spec.path)
    why = check_source(path)
    if why:
        problems.append(Problem("eval.prompts", f"{spec.path}: {why}"))
        return
    try:
        rows = read_rows(path, **spec_options(spec))
    except AlignError as err:
        problems.append(Problem("eval.prompts", str(err)))
        return
    if bad & {"checkers", "limit"}:
        return
    _prompt_problems(rows[: settings.limit], str(spec.path), fields_needed(settings.checkers), "eval.prompts",
                     problems)


GENERATING_METRICS = ("reward", "win_rate", "length", "repetition", "speed")  # besides checkers and samples


def _check_eval_models(recipe, registry, problems: list[Problem], check_hub: bool,
                       bad: set[str] = frozenset()) -> None:
    """The judge (`eval.reward_model`) and opponent (`eval.against`) the hook's reward and win-rate metrics use:
    a stage of the recipe (registered when it runs; until then those metrics are skipped) or a model ref.
    `bad`: eval keys that failed validation, whose checks are left out."""
    from align.rewards.scoring import reward_problem

    settings = recipe.eval
    metrics = settings.metrics if "metrics" not in bad else []
    generating = [m for m in metrics if m in GENERATING_METRICS]
    if generating and settings.prompts is None and "prompts" not in bad:
        problems.append(Problem("eval.prompts", f"metrics {', '.join(generating)} generate responses: set "
                                                "`eval.prompts`"))
    judged = [m for m in metrics if m in ("reward", "win_rate")]
    if judged and settings.reward_model is None and "reward_model" not in bad:
        problems.append(Problem("eval.reward_model", f"metrics {', '.join(judged)} need a judge: set "
                                                     "`eval.reward_model` to a reward entry or reward stage"))
    for key, ref in (("reward_model", settings.reward_model), ("against", settings.against)):
        if ref is None or ref in ("base", "@base") or key in bad:
            continue
        stage = ref[1:] if ref.startswith("@") else ref
        if stage in broken_keys(recipe, "stages"):  # a stage too broken to plan: its own problems say why
            continue
        if stage in recipe.stages:
            kind = recipe.stages[stage].kind
            if key == "reward_model" and kind != "reward":
                problems.append(Problem(f"eval.{key}", f"stage {stage!r} is a {kind} stage, not a reward model"))
            if key == "against" and kind == "reward":
                problems.append(Problem(f"eval.{key}", f"stage {stage!r} is a reward model, not a policy"))
            continue
        source = _resolve(ref, f"eval.{key}", registry, problems, check_hub, recipe)
        if source is not None and key == "reward_model":
            why = reward_problem(source)
            if why:
                problems.append(Problem(f"eval.{key}", why))


def _prompt_problems(rows: list[dict], source: str, needs: dict, where: str, problems: list[Problem]) -> None:
    """Prompt rows without a prompt or without a field a checker reads, the first ten named by file and row."""
    found = prompt_problems(rows, source, needs)
    problems += [Problem(where, str(p)) for p in found[:10]]
    if len(found) > 10:
        problems.append(Problem(where, f"... and {len(found) - 10} more unusable prompt rows"))


def flash_attention_problem(kernel: str) -> str | None:
    """Why `kernel` (flash_attention_2/3) cannot run here, or None: it needs a CUDA GPU and its package."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        return f"{kernel} needs a CUDA GPU; use auto, sdpa or eager here"
    package = "flash_attn" if kernel == "flash_attention_2" else "flash_attn_interface"
    if importlib.util.find_spec(package) is None:
        return f"{kernel} needs the {package} package (pip install flash-attn); or use auto or sdpa"
    return None
