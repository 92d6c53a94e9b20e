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


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_non_utf8_byte_is_named_by_its_line(tmp_path, suffix):
    """Named where an editor shows it, not by an offset into the reader's buffer (was `byte 50`)."""
    path = tmp_path / f"d{suffix}"
    good = json.dumps(ROWS[0]).encode()
    if suffix == ".jsonl":
        path.write_bytes(good + b"\n" + good + b"\n" + b'{"prompt": "caf\xe9", "completion": "b"}\n')
    else:
        path.write_bytes(b"[\n" + good + b",\n" + b'{"prompt": "caf\xe9", "completion": "b"}\n]\n')
    with pytest.raises(DataError) as info:
        read_rows(path)
    assert str(info.value) == (f"{path}: line 3 is not UTF-8 text (byte 0xe9 at column 16); is it a binary file?")


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


# ------------------------------------------------------------------------------------------ hub config, columns


GSM8K = [{"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
          "answer": "48 / 2 = 24\n48 + 24 = 72\n#### 72"}]


@pytest.fixture
def fake_hub(monkeypatch):
    """`datasets.load_dataset` without a network: records its arguments and serves gsm8k-shaped rows."""
    import datasets

    calls = []

    def load_dataset(name, config=None, split=None, revision=None):
        calls.append({"name": name, "config": config, "split": split, "revision": revision})
        if config is None:
            raise ValueError("Config name is missing.\nPlease pick one among the available configs: ['main', 'socratic']")
        return list(GSM8K)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_config_revision_and_columns_reach_the_loader(fake_hub):
    rows = read_rows("hf:openai/gsm8k", split="test", config="main", revision="e53f048",
                     columns={"prompt": "question", "completion": "answer"})
    assert fake_hub == [{"name": "openai/gsm8k", "config": "main", "split": "test", "revision": "e53f048"}]
    assert rows == [{"prompt": GSM8K[0]["question"], "completion": GSM8K[0]["answer"]}]


def test_hub_dataset_without_its_config_says_which_configs_exist(fake_hub):
    with pytest.raises(DataError, match=r"hf:openai/gsm8k \(split train\): cannot load .*Config name is missing"):
        read_rows("hf:openai/gsm8k")


def test_columns_rename_a_local_file_and_keep_other_fields(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "What is 2 + 2?", "a": "4", "id": 7}])
    assert read_rows(path, columns={"prompt": "q", "completion": "a"}) == [
        {"id": 7, "prompt": "What is 2 + 2?", "completion": "4"}]


def test_a_row_without_a_mapped_column_names_file_key_and_row(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "1?", "a": "1"}, {"q": "2?", "answer": "2"}])
    with pytest.raises(DataError, match=r"d.jsonl: row 1: no column 'a' for columns.completion \(the row's "
                                        r"columns: answer, q\)"):
        read_rows(path, columns={"prompt": "q", "completion": "a"})


def test_recipe_data_spec_plumbs_config_and_columns_into_the_stage_data(fake_hub, tmp_path):
    """A recipe naming gsm8k with its config and a column mapping gives the SFT stage prompt/completion
    conversations, through the same loader the stage uses."""
    from align.data.prepare import load_demonstrations
    from align.config.loading import validate_recipe

    spec = {"path": "hf:openai/gsm8k", "config": "main", "split": "train",
            "columns": {"prompt": "question", "completion": "answer"}}
    recipe = validate_recipe({"name": "gsm", "base": "x", "stages": {"sft": {"data": spec}}}, [],
                             source=str(tmp_path / "r.yaml"))
    conversations, report = load_demonstrations(recipe, recipe.stages["sft"].data)
    assert fake_hub[-1]["config"] == "main"
    assert conversations.format == "prompt_completion" and not conversations.problems
    assert conversations.rows[0][-1] == {"role": "assistant", "content": GSM8K[0]["answer"]}
    assert report.source == "hf:openai/gsm8k"


@pytest.mark.parametrize("spec, message", [
    ({"path": "data.jsonl", "config": "main"}, "config applies to hub datasets (path: hf:org/name) only"),
    ({"path": "data.jsonl", "config": "main", "revision": "v1"}, "config and revision apply to hub datasets"),
    ({"path": "hf:a/b", "columns": {"prompt": ""}}, "columns: names must not be empty"),
    ({"path": "hf:a/b", "columns": ["prompt"]}, "stages.sft.data.columns: expected a mapping"),
])
def test_data_spec_problems_are_recipe_errors(spec, message):
    from align.errors import ConfigError
    from align.config.loading import validate_recipe

    with pytest.raises(ConfigError) as info:
        validate_recipe({"name": "x", "base": "x", "stages": {"sft": {"data": spec}}}, [])
    assert message in str(info.value) and "stages.sft.data" in str(info.value)
