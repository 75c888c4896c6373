"""read_records: JSONL, a datasets save_to_disk folder or a parquet file, with one-line errors."""

import json
import sys

import pytest

from tether.data import read_records
from tether.errors import TetherError

datasets = pytest.importorskip("datasets")

ROWS = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}, {"prompt": "2+2=", "chosen": "4", "rejected": "5"}]
REQUIRED = ("prompt", "chosen", "rejected")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_same_records_from_every_source(tmp_path):
    jsonl = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    folder = tmp_path / "pairs_ds"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(folder))
    parquet = tmp_path / "pairs.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(parquet))
    for source in (jsonl, folder, parquet, str(folder)):
        assert read_records(source, REQUIRED) == ROWS, source


def test_datasetdict_folder(tmp_path):
    one = tmp_path / "one"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(one))
    assert read_records(one, ("prompt",)) == ROWS
    two = tmp_path / "two"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS)}
    ).save_to_disk(str(two))
    with pytest.raises(TetherError, match=r"splits train, test; give one split's folder"):
        read_records(two, ("prompt",))
    assert read_records(two / "test", ("prompt",)) == ROWS


def test_extra_columns_are_kept(tmp_path):
    rows = [{"prompt": "a", "id": 7}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    assert read_records(tmp_path / "ds", ("prompt",)) == rows


@pytest.mark.parametrize("kind", ["folder", "parquet"])
def test_field_errors_name_file_and_row(tmp_path, kind):
    def make(rows, name):
        path = tmp_path / (name if kind == "folder" else f"{name}.parquet")
        ds = datasets.Dataset.from_list(rows)
        ds.save_to_disk(str(path)) if kind == "folder" else ds.to_parquet(str(path))
        return path

    path = make([{"prompt": "a", "response": "b"}, {"prompt": "c", "response": None}], "null")
    with pytest.raises(TetherError, match=rf"^{path}: row 2: missing field 'response'$"):
        read_records(path, ("prompt", "response"))
    path = make([{"prompt": "a"}], "absent")
    with pytest.raises(TetherError, match=rf"^{path}: row 1: missing field 'response' \(columns: prompt\)$"):
        read_records(path, ("prompt", "response"))
    path = make(
        [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}, {"prompt": "e", "response": "f"}], "ok"
    )
    read_records(path, ("prompt", "response"))
    path = make([{"prompt": 1}, {"prompt": 2}], "ints")
    with pytest.raises(
        TetherError, match=rf"^{path}: row 1: field 'prompt' must be a string or a list of .* messages$"
    ):
        read_records(path, ("prompt",))
    if kind == "parquet":  # (datasets itself cannot load_from_disk an empty saved dataset)
        path = make([{"prompt": "a"}], "empty")
        datasets.Dataset.from_list([{"prompt": "a"}]).select([]).to_parquet(str(path))
        with pytest.raises(TetherError, match=rf"^{path}: no records$"):
            read_records(path, ("prompt",))


def test_source_errors(tmp_path):
    with pytest.raises(TetherError, match="data file not found"):
        read_records(tmp_path / "missing.jsonl", ("prompt",))
    with pytest.raises(TetherError, match="data file not found"):
        read_records(tmp_path / "missing.parquet", ("prompt",))
    (tmp_path / "plain").mkdir()
    with pytest.raises(TetherError, match=r"plain: a folder, but not a Hugging Face datasets folder"):
        read_records(tmp_path / "plain", ("prompt",))
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(TetherError, match=r"bad.parquet: not a readable parquet file"):
        read_records(tmp_path / "bad.parquet", ("prompt",))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "state.json").write_text("{")
    with pytest.raises(TetherError, match=r"broken: cannot load the dataset"):
        read_records(broken, ("prompt",))
    # JSONL keeps read_jsonl's file:line messages
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "a"}, {"prompt": 3}])
    with pytest.raises(TetherError, match=r"x.jsonl:2: field 'prompt' must be a string"):
        read_records(path, ("prompt",))


def test_missing_datasets_package(tmp_path, monkeypatch):
    folder = tmp_path / "ds"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(folder))
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "p.parquet"))
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(TetherError, match=r"needs the datasets package \(pip install 'tether\[data\]'\)"):
        read_records(folder, ("prompt",))
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(TetherError, match=r"needs the pyarrow package"):
        read_records(tmp_path / "p.parquet", ("prompt",))
    assert read_records(write_jsonl(tmp_path / "ok.jsonl", ROWS), ("prompt",)) == ROWS  # JSONL needs neither
