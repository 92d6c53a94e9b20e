"""Reading rows from JSONL, JSON, parquet or a hub dataset, with errors that name the file and line.

A corrupt or truncated file is one clear `DataError` ("data/x.jsonl: line 17 is not valid JSON"), not a
traceback. Rows are plain dicts; their meaning is decided by `align.data.formats`.
"""

from __future__ import annotations

import json
from pathlib import Path

from align.errors import DataError, byte_place
from align.fingerprint import hash_file, hash_json

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


def read_rows(path: Path | str, split: str = "train", limit: int | None = None) -> list[dict]:
    text = str(path)
    if is_hub_dataset(text):
        rows = _read_hub(text[3:], split)
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
    return rows[:limit] if limit else rows


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


def _read_hub(name: str, split: str) -> list[dict]:
    try:
        from datasets import load_dataset

        return list(load_dataset(name, split=split))
    except Exception as err:  # noqa: BLE001
        raise DataError(f"hf:{name} (split {split}): cannot load ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:200]})") from None
