"""Reading a recipe: YAML file to typed `Recipe`, with `--set` overrides and `defaults` merged into stages.

Every problem is reported at once, in one `ConfigError`: schema errors, the cross-field checks pydantic
would only run once those are fixed, and a partial recipe (as far as it validates) so the plan's checks of
files, refs and data join the same report. The schema itself is `align.config.recipe`; the wording of each
problem is `align.config.problems`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from align.config.problems import clean_loc, format_loc, model_in, problems_from_pydantic
from align.config.recipe import Defaults, EvalSettings, Recipe, recipe_model, stage_config_types
from align.config.schema import CrossFieldProblems
from align.errors import ConfigError, Problem, byte_place


def load_recipe(path: str | Path, overrides: list[str] | None = None, workdir: str | None = None) -> Recipe:
    """Read a recipe file, apply `key.path=value` overrides, validate; raise one `ConfigError` with all problems.
    `workdir`: the folder its relative paths were written against, when not the working directory."""
    path = Path(path)
    return validate_recipe(read_recipe_file(path), overrides or [], source=str(path), workdir=workdir)


def read_recipe_file(path: Path) -> Any:
    """The recipe file's YAML. Undecodable bytes, syntax errors and a key given twice in one mapping (YAML
    would keep the last value without a word) are refused, each named by its line."""
    if not path.is_file():
        raise ConfigError([Problem(str(path), "recipe file not found")])
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line, column = byte_place(data, err.start)
        raise ConfigError([Problem(f"{path}:{line}:{column}", f"not UTF-8 text (byte 0x{data[err.start]:02x}); "
                                                              "save the recipe as UTF-8")]) from None
    try:
        duplicates = _duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader), str(path))
        if duplicates:
            raise ConfigError(duplicates)
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError([Problem(where, f"not valid YAML ({getattr(err, 'problem', err)})")]) from None


def _duplicate_keys(node, source: str, path: tuple = (), seen: set | None = None) -> list[Problem]:
    """Keys given twice in one YAML mapping, each named by its line and key path."""
    seen = set() if seen is None else seen
    if node is None or id(node) in seen:  # an alias refers to a node already walked
        return []
    seen.add(id(node))
    found: list[Problem] = []
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            found += _duplicate_keys(item, source, (*path, index), seen)
    if not isinstance(node, yaml.MappingNode):
        return found
    first: dict[tuple, int] = {}
    for key_node, value_node in node.value:
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        line = key_node.start_mark.line + 1
        if key is not None and key != "<<":
            if (key_node.tag, key) in first:
                found.append(Problem(f"{source}:{line}", f"duplicate key `{format_loc((*path, key))}` (first at "
                                     f"line {first[(key_node.tag, key)]}); YAML would silently keep only the last"))
            else:
                first[(key_node.tag, key)] = line
        found += _duplicate_keys(value_node, source, (*path, key if key is not None else "?"), seen)
    return found


def validate_recipe(raw: Any, overrides: list[str], source: str | None = None,
                    workdir: str | None = None) -> Recipe:
    """The recipe, or one `ConfigError` with every schema and cross-field problem. The error carries the
    recipe as far as it validates (`partial`), so the plan's checks of files, refs and data join the report."""
    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else f"a {type(raw).__name__}"
        raise ConfigError([Problem("", f"a recipe must be a YAML mapping, got {got}")], source)
    problems: list[Problem] = []
    raw = apply_overrides(raw, overrides, problems)
    for key in ("source", "workdir"):  # fields align sets itself; from the YAML they would be overwritten unseen
        if key in raw:
            problems.append(Problem(key, "unknown key (align records where the recipe came from itself)"))
    names = list(raw["stages"]) if isinstance(raw.get("stages"), dict) else []
    inherited: dict[str, set[tuple]] = {}
    raw = _merge_defaults_and_kinds(raw, problems, inherited)
    try:
        recipe = recipe_model().model_validate({**raw, "source": source, "workdir": workdir})
    except ValidationError as err:
        errors = err.errors()
        problems += [p for e in errors for p in problems_from_pydantic(_placed(e, inherited), raw)]
        problems += _cross_field_problems(raw, errors, problems)
        partial = _partial_recipe(raw, names, source, workdir)
        raise ConfigError(list(dict.fromkeys(problems)), source, partial=partial) from None
    if problems:
        recipe._broken = {"stages": set(names) - set(recipe.stages)}
        raise ConfigError(problems, source, partial=recipe)
    return recipe


def _placed(error: dict, inherited: dict[str, set[tuple]]) -> dict:
    """`error` with its path cleaned (`clean_loc`); an error in a value a stage inherited from `defaults` is
    placed where the user wrote it (`defaults.lora.rr`, reported once), not under every stage."""
    loc = clean_loc(error["loc"])
    if len(loc) > 2 and loc[0] == "stages":
        for depth in (1, 2):
            if len(loc) >= 2 + depth and tuple(loc[2:2 + depth]) in inherited.get(loc[1], set()):
                return {**error, "loc": ("defaults", *loc[2:])}
    return {**error, "loc": loc}


def _partial_recipe(raw: dict, names: list[str], source: str | None, workdir: str | None) -> Recipe:
    """The recipe as far as it validates, so the plan checks what it can of a recipe with schema errors in
    the same report: each block keeps the keys that validate on their own, the others take their defaults
    and are listed in `broken_keys`; a stage that cannot be built at all (unknown kind, not a mapping) is
    listed under `stages`."""
    top, broken_top = _valid_values(Recipe, raw, keys=("name", "base", "registry", "defaults"))
    top.setdefault("name", raw["name"] if isinstance(raw.get("name"), str) else "recipe")
    top.setdefault("base", None)
    bodies = raw.get("stages") if isinstance(raw.get("stages"), dict) else {}
    if not isinstance(raw.get("stages"), dict):
        broken_top.add("stages")
    stages, broken, kinds = {}, {}, stage_config_types()
    for name, body in bodies.items():
        model = kinds.get(body.get("kind")) if isinstance(body, dict) else None
        if model is not None:
            stages[name], broken[f"stages.{name}"] = _valid_block(model, body)
    settings, broken["eval"] = EvalSettings(), set()
    if isinstance(raw.get("eval", {}), dict):
        settings, broken["eval"] = _valid_block(EvalSettings, raw.get("eval", {}))
    else:
        broken_top.add("eval")
    recipe = Recipe.model_construct(**top, stages=stages, eval=settings, source=source, workdir=workdir)
    recipe._broken = {**broken, "": broken_top, "stages": set(names) - set(stages)}
    return recipe


def _valid_block(model: type[BaseModel], body: dict) -> tuple[BaseModel, set[str]]:
    """`model` built from `body` (its valid keys, defaults for the rest) and the keys that did not validate."""
    try:
        return model.model_validate(body), set()
    except ValidationError:
        values, broken = _valid_values(model, body)
        return model.model_construct(**values), broken


def _valid_values(model: type[BaseModel], body: dict, keys=None) -> tuple[dict, set[str]]:
    """The fields of `body` that validate on their own (by field name), and the keys (of `keys`, default all)
    that are missing while required or do not validate."""
    values, broken = {}, set()
    for name, field in model.model_fields.items():
        key = field.alias or name
        if keys is not None and key not in keys:
            continue
        if key not in body:
            if field.is_required():
                broken.add(key)
            continue
        try:
            values[name] = _field_adapter(model, name).validate_python(body[key])
        except ValidationError:
            broken.add(key)
    return values, broken


@functools.lru_cache(maxsize=None)
def _field_adapter(model: type[BaseModel], name: str) -> TypeAdapter:
    """A validator for one field of `model` alone, with its constraints (built once: each costs milliseconds)."""
    field = model.model_fields[name]
    return TypeAdapter(Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation)


def _cross_field_problems(raw: dict, errors: list[dict], found: list[Problem]) -> list[Problem]:
    """The checks between fields (`model_validator`s) of stages that also have key or type errors.

    Pydantic runs a model's cross-field checks only once all its fields validated, so they would surface
    only after the other errors were fixed. Here, for each such stage (and each nested block with errors),
    the fields that did validate are collected, the rest take their defaults, and the block's cross-field
    checks run on that. A check that reads a field with an error judges its default, so it may mention a
    value the recipe did not set; the fields it names are still in conflict as written."""
    stages = raw.get("stages") if isinstance(raw.get("stages"), dict) else {}
    bad: dict[str, list[tuple]] = {}
    for error in errors:
        loc = clean_loc(error["loc"])
        if len(loc) >= 3 and loc[0] == "stages" and isinstance(stages.get(loc[1]), dict):
            bad.setdefault(loc[1], []).append(loc[2:])
    seen = {str(p) for p in found}
    extra: list[Problem] = []
    kinds = stage_config_types()
    for name, locs in bad.items():
        body = stages[name]
        model = kinds.get(body.get("kind"))
        if model is not None:
            for problem in _after_checks(model, body, ("stages", name), locs):
                if str(problem) not in seen:
                    seen.add(str(problem))
                    extra.append(problem)
    return extra


def _after_checks(model: type[BaseModel], body: dict, where: tuple, bad_locs: list[tuple]) -> list[Problem]:
    """Run `model`'s after-validators on the fields of `body` that validate alone (defaults for the rest),
    recursing into nested mappings that have errors of their own."""
    problems: list[Problem] = []
    bad_keys = {loc[0] for loc in bad_locs if loc}
    values = {}
    for name, field in model.model_fields.items():
        key = field.alias or name
        if key not in body:
            continue
        nested = model_in(field.annotation)
        if key in bad_keys:
            if nested is not None and isinstance(body[key], dict):
                problems += _after_checks(nested, body[key], (*where, key),
                                          [loc[1:] for loc in bad_locs if loc and loc[0] == key])
            continue
        try:
            values[name] = _field_adapter(model, name).validate_python(body[key])
        except ValidationError:
            continue
    instance = model.model_construct(**values)
    for decorator in model.__pydantic_decorators__.model_validators.values():
        if decorator.info.mode != "after":
            continue
        try:
            decorator.func(instance)
        except (ValueError, AssertionError) as err:
            messages = err.messages if isinstance(err, CrossFieldProblems) else [str(err)]
            problems += [Problem(format_loc(where), m[:1].lower() + m[1:]) for m in messages]
        except Exception:  # a check that needs a field this block lacks: nothing to say about it
            continue
    return problems


def apply_overrides(raw: dict, overrides: list[str], problems: list[Problem]) -> dict:
    """`stages.sft.lr=1e-4` sets one key; the value is parsed as YAML (so `true`, `[a, b]` work)."""
    raw = _deep_copy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            problems.append(Problem(f"--set {item}", "expected KEY.PATH=VALUE"))
            continue
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        node = raw
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                problems.append(Problem(f"--set {key}", f"`{'.'.join(parts[: i + 1])}` is not a mapping"))
                break
            node = nxt
        else:
            node[parts[-1]] = value
    return raw


def _merge_defaults_and_kinds(raw: dict, problems: list[Problem], inherited: dict | None = None) -> dict:
    """Fill each stage's `kind` from its key and its unset fields from `defaults` (only the keys `Defaults`
    accepts: any other is reported there and merged nowhere). `inherited` receives, per stage, the key paths
    whose values came from `defaults`, so their errors are reported there, once."""
    inherited = {} if inherited is None else inherited
    stages = raw.get("stages")
    if isinstance(stages, dict) and not stages:
        problems.append(Problem("stages", "a recipe needs at least one stage"))
    if not isinstance(stages, dict):
        return raw
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        defaults = {}
    merged, kinds = {}, stage_config_types()
    for name, body in stages.items():
        if body is None:
            body = {}
        if not isinstance(body, dict):
            merged[name] = body
            continue
        body = dict(body)
        kind = body.get("kind", name)
        if kind not in kinds:
            known = ", ".join(kinds)
            where = f"stages.{name}.kind" if "kind" in body else f"stages.{name}"
            problems.append(Problem(where, f"unknown stage kind {kind!r}; expected one of {known} "
                                           f"(or add `kind:` to a stage with another name)"))
            continue
        body["kind"] = kind
        stage_fields = kinds[kind].model_fields
        came = inherited.setdefault(name, set())
        for key, value in defaults.items():
            if key not in stage_fields or key not in Defaults.model_fields or value is None:
                continue
            if key not in body:
                body[key] = _deep_copy(value)
                came.add((key,))
            elif isinstance(value, dict) and isinstance(body[key], dict):
                came.update((key, sub) for sub in value if sub not in body[key])
                body[key] = {**_deep_copy(value), **body[key]}
        merged[name] = body
    return {**raw, "stages": merged}


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


__all__ = ["load_recipe", "read_recipe_file", "validate_recipe", "apply_overrides"]
