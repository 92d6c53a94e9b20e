"""Reading rows from JSONL, JSON, parquet or a hub dataset, with errors that name the file and line.

A corrupt or truncated file is one clear `DataError` ("data/x.jsonl: line 17 is not valid JSON"), not a
traceback. Rows are plain dicts; their meaning is decided by `align.data.formats`.
"""

from __future__ import annotations

import json
from pathlib import Path

from align.errors import DataError, byte_place
from align.registry.fingerprint import hash_file, hash_json

SUFFIXES = (".jsonl", ".json", ".parquet")


def is_hub_dataset(path: str) -> bool:
    return path.startswith("hf:")


def check_source(path: Path | str) -> str | None:
    """Why a data source cannot be read (for `align plan`), or None."""
    text = str(path)
    if is_hub_dataset(text):
        return None
    path = Path(path)
    if not path.exists():
        return "file not found"
    if path.is_dir():
        return "is a folder, expected a .jsonl, .json or .parquet file"
    if path.suffix not in SUFFIXES:
        return f"unsupported file type {path.suffix or '(none)'}; use .jsonl, .json or .parquet"
    return None


def read_rows(path: Path | str, split: str = "train", limit: int | None = None, config: str | None = None,
              revision: str | None = None, columns: dict[str, str] | None = None) -> list[dict]:
    """Rows of a file or hub dataset (`config`: the hub dataset's subset, `revision`: its branch, tag or commit),
    with `columns` ({new: old}) renamed (`rename_columns`)."""
    text = str(path)
    if is_hub_dataset(text):
        rows = _read_hub(text[3:], split, config, revision)
    else:
        problem = check_source(path)
        if problem:
            raise DataError(f"{path}: {problem}")
        path = Path(path)
        if path.suffix == ".jsonl":
            rows = _read_jsonl(path)
        elif path.suffix == ".json":
            rows = _read_json(path)
        else:
            rows = _read_parquet(path)
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {index} is a {type(row).__name__}, expected an object with fields")
    rows = rows[:limit] if limit else rows
    return rename_columns(rows, columns, text) if columns else rows


def spec_options(spec) -> dict:
    """The `read_rows` arguments a recipe's data spec (`align.config.schema.DataSpec`) sets besides its path."""
    return {"split": spec.split, "limit": spec.limit, "config": getattr(spec, "config", None),
            "revision": getattr(spec, "revision", None), "columns": getattr(spec, "columns", None) or None}


def rename_columns(rows: list[dict], columns: dict[str, str], where: str) -> list[dict]:
    """Each row with its column `old` under the name `new`, for every `new: old` of `columns` (the other
    columns kept as they are), so a dataset's own field names (gsm8k's question/answer) read as a known
    format's (prompt/completion). A row without a named column is an error naming the file, key and row."""
    olds = set(columns.values())
    out = []
    for index, row in enumerate(rows):
        missing = [(new, old) for new, old in columns.items() if old not in row]
        if missing:
            new, old = missing[0]
            has = ", ".join(sorted(map(str, row))[:12]) or "none"
            raise DataError(f"{where}: row {index}: no column {old!r} for columns.{new} (the row's columns: {has})")
        renamed = {k: v for k, v in row.items() if k not in olds}
        renamed.update({new: row[old] for new, old in columns.items()})
        out.append(renamed)
    return out


def fingerprint(path: Path | str, rows: list[dict] | None = None) -> str:
    """File hash for local files; content hash for hub datasets (which have no single file)."""
    if not is_hub_dataset(str(path)) and Path(path).is_file():
        return hash_file(path)
    return hash_json(rows or [])


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    try:
        handle = open(path, encoding="utf-8-sig")
    except OSError as err:
        raise DataError(f"{path}: cannot open ({err.strerror})") from None
    with handle:
        try:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    hint = " (the file may be truncated)" if not line.endswith("\n") else ""
                    raise DataError(f"{path}: line {line_no} is not valid JSON: {err.msg}{hint}") from None
        except UnicodeDecodeError:
            raise DataError(f"{path}: {_undecodable(path)}") from None
    return rows


def _undecodable(path: Path) -> str:
    """Where the first byte that is not UTF-8 sits, by line and column (the text reader's error gives only an
    offset into its own read buffer)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line, column = byte_place(data, err.start)
        return f"line {line} is not UTF-8 text (byte 0x{data[err.start]:02x} at column {column}); is it a binary file?"
    return "not UTF-8 text; is it a binary file?"


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise DataError(f"{path}: {_undecodable(path)}") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a list of rows, or an object holding exactly one list")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of rows, got {type(data).__name__}")
    return data


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataError(f"{path}: cannot read parquet ({type(err).__name__}: {err})") from None


def _read_hub(name: str, split: str, config: str | None = None, revision: str | None = None) -> list[dict]:
    where = ", ".join(part for part in (f"config {config}" if config else "", f"split {split}",
                                        f"revision {revision}" if revision else "") if part)
    try:
        from datasets import load_dataset

        return list(load_dataset(name, config, split=split, revision=revision))
    except Exception as err:  # noqa: BLE001
        raise DataError(f"hf:{name} ({where}): cannot load ({type(err).__name__}: "
                        f"{(str(err).splitlines() or [''])[0][:200]})") from None
