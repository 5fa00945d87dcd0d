"""File and tabular datasets on a local datastore: creation, reading, registry, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from cairn import Dataset, NotFoundError, UserInputError
from cairn.data.datasets import DatasetError


@pytest.fixture
def store(workspace):
    ds = workspace.get_default_datastore()
    root = Path(ds.root)
    (root / "iris").mkdir()
    (root / "iris" / "part 1.csv").write_text("a,b,name\n1,2.5,x\n3,4.5,y\n")
    (root / "iris" / "part_2.csv").write_text("a,b,name\n5,6.5,z\n")
    (root / "empty").mkdir()
    (root / "ünï").mkdir()
    (root / "ünï" / "d.jsonl").write_text('{"k": 1}\n{"k": 2}\n')
    return ds


def test_file_dataset_lists_downloads_and_mounts(store, tmp_path):
    files = Dataset.File.from_files((store, "iris/"))
    assert files.to_path() == ["part 1.csv", "part_2.csv"]
    got = files.download(tmp_path / "dl")
    assert [Path(p).name for p in got] == ["part 1.csv", "part_2.csv"]
    with pytest.raises(FileExistsError, match="overwrite=True"):
        files.download(tmp_path / "dl")
    with files.mount() as folder:  # a local datastore: the data's own folder, no copy
        assert Path(folder) == Path(store.root) / "iris"


def test_tabular_reading_and_transformations(store):
    table = Dataset.Tabular.from_delimited_files([(store, "iris/*.csv")], include_path=True)
    df = table.to_pandas_dataframe()
    assert list(df.columns) == ["Path", "a", "b", "name"] and len(df) == 3
    assert df["a"].tolist() == [1, 3, 5] and df["Path"].tolist()[0] == "part 1.csv"
    assert table.take(2).to_pandas_dataframe()["a"].tolist() == [1, 3]
    assert table.skip(2).to_pandas_dataframe()["a"].tolist() == [5]
    assert list(table.keep_columns(["a"]).to_pandas_dataframe().columns) == ["a"]
    assert "name" not in table.drop_columns("name").to_pandas_dataframe().columns
    left, right = table.random_split(0.5, seed=3)
    assert len(left.to_pandas_dataframe()) + len(right.to_pandas_dataframe()) == 3
    typed = Dataset.Tabular.from_delimited_files((store, "iris/part_2.csv"), set_column_types={"a": "float"})
    assert typed.to_pandas_dataframe()["a"].dtype == float
    lines = Dataset.Tabular.from_json_lines_files(store.path("ünï/d.jsonl"))
    assert lines.to_pandas_dataframe()["k"].tolist() == [1, 2]


def test_bad_input_gives_clear_errors(store):
    root = Path(store.root)
    (root / "bad.csv").write_text("a,b\n1,2\n3,4,5\n")
    with pytest.raises(DatasetError, match="bad.csv, line 3: expected 2 columns, got 3"):
        Dataset.Tabular.from_delimited_files((store, "bad.csv")).to_pandas_dataframe()
    skipped = Dataset.Tabular.from_delimited_files((store, "bad.csv"), on_error="skip").to_pandas_dataframe()
    assert skipped["a"].tolist() == [1]
    (root / "latin.csv").write_bytes("name\ncaf\xe9\n".encode("latin1"))
    with pytest.raises(DatasetError, match="latin.csv, line 2: not valid UTF-8"):
        Dataset.Tabular.from_delimited_files((store, "latin.csv")).to_pandas_dataframe()
    assert Dataset.Tabular.from_delimited_files((store, "latin.csv"), encoding="latin1") \
        .to_pandas_dataframe()["name"].tolist() == ["café"]
    with pytest.raises(FileNotFoundError, match="match no file"):
        Dataset.File.from_files((store, "empty/"))
    with pytest.raises(FileNotFoundError, match="match no file"):
        Dataset.File.from_files((store, "iris/*.parquet"))
    with pytest.raises(UserInputError, match="stay inside"):
        Dataset.File.from_files((store, "../outside"))
    with pytest.raises(UserInputError, match="not valid"):
        Dataset.File.from_files("/etc/passwd")
    with pytest.raises(DatasetError, match="no column"):
        Dataset.Tabular.from_delimited_files((store, "iris/")).keep_columns(["nope"]).to_pandas_dataframe()


def test_registry_versions_follow_the_content(workspace, store):
    first = Dataset.File.from_files((store, "iris/")).register(workspace, "iris", description="flowers",
                                                               tags={"team": "a"})
    assert (first.name, first.version, first.tags) == ("iris", 1, {"team": "a"})
    same = Dataset.File.from_files((store, "iris/")).register(workspace, "iris")
    assert same.version == 1 and same.id == first.id  # identical: no new version
    (Path(store.root) / "iris" / "part_3.csv").write_text("a,b,name\n7,8.5,w\n")
    with pytest.raises(UserInputError, match="create_new_version=True"):
        Dataset.File.from_files((store, "iris/")).register(workspace, "iris")
    second = Dataset.File.from_files((store, "iris/")).register(workspace, "iris", create_new_version=True)
    assert second.version == 2
    assert Dataset.get_by_name(workspace, "iris").version == 2
    assert Dataset.get_by_name(workspace, "iris", version=1).to_path() == ["part 1.csv", "part_2.csv", "part_3.csv"]
    assert Dataset.get_by_id(workspace, first.id).version == 1
    assert set(Dataset.get_all(workspace)) == {"iris"}
    with pytest.raises(NotFoundError, match="registered: iris"):
        Dataset.get_by_name(workspace, "nope")
    assert Dataset.get_by_name(workspace, "iris", version=1).content_digest == second.content_digest


def test_a_dataset_reads_the_files_its_store_has_now(store, tmp_path):
    """A dataset names files in a store, not a copy of them: files removed or added after it was
    made are not listed, fetched or read from its first listing."""
    files = Dataset.File.from_files((store, "iris/"))
    table = Dataset.Tabular.from_delimited_files([(store, "iris/*.csv")])
    assert files.to_path() == ["part 1.csv", "part_2.csv"] and len(table.to_pandas_dataframe()) == 3
    (Path(store.root) / "iris" / "part_2.csv").unlink()
    (Path(store.root) / "iris" / "part_3.csv").write_text("a,b,name\n7,8.5,w\n9,1.5,v\n")
    assert files.to_path() == ["part 1.csv", "part_3.csv"]
    assert sorted(Path(p).name for p in files.download(tmp_path / "dl")) == ["part 1.csv", "part_3.csv"]
    assert table.to_pandas_dataframe()["a"].tolist() == [1, 3, 7, 9]


def test_a_local_copy_entry_names_the_files_of_a_folder_where_they_are(tmp_path) -> None:
    """``cairn debug`` gives a recreated step's direct-mode Dataset one entry: the folder of its copies."""
    import pytest

    from cairn.data.datasets import DatasetError, resolve_files

    copy = tmp_path / "copies::x [draft]"
    (copy / "b").mkdir(parents=True)
    (copy / "b" / "two.csv").write_text("a\n2\n")
    (copy / "one.csv").write_text("a\n1\n")
    files = resolve_files({"paths": [{"local_copy": str(copy)}]}, locate=None)
    assert [(f.relative, f.size, f.datastore) for f in files] == [("b/two.csv", 4, None), ("one.csv", 4, None)]
    alone = resolve_files({"paths": [{"local_copy": str(copy / "one.csv")}]}, locate=None)
    assert [f.relative for f in alone] == ["one.csv"]
    (copy / "gone.csv").symlink_to(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="cannot be read"):
        resolve_files({"paths": [{"local_copy": str(copy)}]}, locate=None)
    with pytest.raises(DatasetError, match="cannot be read"):
        resolve_files({"paths": [{"local_copy": str(tmp_path / "missing")}]}, locate=None)
