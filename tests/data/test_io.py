from __future__ import annotations

import json

import pytest

from align.data.io import check_source, read_rows
from align.errors import DataError

ROWS = [{"prompt": "What is 12 + 7?", "completion": "19"}, {"prompt": "Hi", "completion": "Hello"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_read_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert read_rows(path) == ROWS


def test_read_jsonl_skips_blank_lines_and_limits(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n  \n" + json.dumps(ROWS[1]) + "\n")
    assert read_rows(path) == ROWS
    assert read_rows(path, limit=1) == ROWS[:1]


def test_read_json_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS))
    assert read_rows(path) == ROWS


def test_read_json_object_with_one_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"version": "1.0", "data": ROWS}))
    assert read_rows(path) == ROWS


def test_read_json_object_with_two_lists_is_an_error(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"train": ROWS, "test": ROWS}))
    with pytest.raises(DataError, match="exactly one list") as info:
        read_rows(path)
    assert str(path) in str(info.value)


def test_read_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert read_rows(path) == ROWS


def test_truncated_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in ROWS) + json.dumps(ROWS[0])[:15]  # third line cut mid-object
    path.write_text(text)
    with pytest.raises(DataError) as info:
        read_rows(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "line 3 " in message
    assert "truncated" in message


def test_bad_line_in_middle_names_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{not json}\n" + json.dumps(ROWS[1]) + "\n")
    with pytest.raises(DataError) as info:
        read_rows(path)
    assert str(path) in str(info.value)
    assert "line 2 " in str(info.value)
    assert "truncated" not in str(info.value)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_binary_file_is_a_data_error(tmp_path, suffix):
    path = tmp_path / f"d{suffix}"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe\x00\x80\x81" * 8)
    with pytest.raises(DataError) as info:
        read_rows(path)
    assert str(path) in str(info.value)


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nope.jsonl"
    assert check_source(path) == "file not found"
    with pytest.raises(DataError) as info:
        read_rows(path)
    assert str(info.value) == f"{path}: file not found"


def test_unsupported_suffix_and_folder(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type .csv"):
        read_rows(csv)
    with pytest.raises(DataError, match="is a folder"):
        read_rows(tmp_path)


def test_row_that_is_not_an_object_is_named_by_index(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([ROWS[0], ROWS[1], ["a", "list"]]))
    with pytest.raises(DataError) as info:
        read_rows(path)
    message = str(info.value)
    assert str(path) in message
    assert "row 2 is a list" in message


def test_jsonl_row_that_is_not_an_object_is_named_by_index(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n42\n")
    with pytest.raises(DataError, match="row 1 is a int"):
        read_rows(path)
