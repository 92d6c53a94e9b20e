"""The shipped recipes and what each is for (`align recipes`, `make recipes`).

Why: a new user's first question is which recipe to start from; the files' names say little. Each recipe
states its purpose in its `description:` key; a recipe without one shows the first sentence of its leading
comment. Files that are not recipes (the accelerate configs under `recipes/accelerate/`) are left out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


@dataclass
class RecipeInfo:
    path: Path
    name: str
    stages: list[str]
    description: str


def shipped_recipes(folder: Path | None = None) -> list[RecipeInfo]:
    """Every recipe under `folder` (default: the repository's `recipes/`), sorted by path."""
    folder = Path(folder) if folder is not None else RECIPES_DIR
    found = (describe(path) for path in sorted(folder.rglob("*.y*ml")))
    return [info for info in found if info is not None]


def describe(path: Path) -> RecipeInfo | None:
    """A recipe file's name, stages and one-line description; None for a YAML file that is not a recipe."""
    try:
        text = path.read_text(encoding="utf-8")
        raw = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("stages"), dict) or "name" not in raw:
        return None
    description = raw.get("description") or first_comment_sentence(text)
    return RecipeInfo(path=path, name=str(raw["name"]), stages=list(raw["stages"]), description=str(description))


def first_comment_sentence(text: str) -> str:
    """The first sentence of a file's leading `#` comment block ("" when it has none)."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    joined = " ".join(part for part in lines if part)
    match = re.match(r"(.+?[.!?])(\s|$)", joined)
    return match.group(1) if match else joined


def format_table(recipes: list[RecipeInfo], root: Path | None = None) -> str:
    """One recipe a line: its path (relative to `root` where it lies under it), stages, description."""
    def shown(path: Path) -> str:
        try:
            return str(path.relative_to(root)) if root is not None else str(path)
        except ValueError:
            return str(path)

    width = max((len(shown(r.path)) for r in recipes), default=0)
    stage_width = max((len(", ".join(r.stages)) for r in recipes), default=0)
    return "\n".join(f"{shown(r.path):{width}}  {', '.join(r.stages):{stage_width}}  {r.description}" for r in recipes)
