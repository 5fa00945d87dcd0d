"""Edge cases found in review: escaping keys, same names in several paths, URL versions, prefixes,
overwritten destinations, text-only columns, Azure ML encoding names, lineage of registered outputs."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from cairn import Dataset, Datastore, Experiment, OutputFileDatasetConfig, Pipeline, PythonScriptStep, UserInputError
from cairn.data.datasets import DatasetError


@pytest.fixture
def s3(workspace, moto_s3):
    return Datastore.register_s3_bucket(
        workspace, "lake", bucket_name=f"b{uuid.uuid4().hex[:10]}", endpoint_url=moto_s3["endpoint_url"],
        access_key_id=moto_s3["access_key_id"], secret_access_key=moto_s3["secret_access_key"],
        create_if_not_exists=True)


def _put(store, key: str, text: str) -> None:
    fs, root = store._location().filesystem()
    with fs.open(f"{root}/{key}", "wb") as f:
        f.write(text.encode())
    fs.invalidate_cache()


def test_keys_that_climb_out_are_refused(s3, tmp_path):
    _put(s3, "trav/../../../escape.txt", "x")
    target = tmp_path / "deep" / "a"
    with pytest.raises(UserInputError, match="escape"):
        s3.download(target, prefix="trav", show_progress=False)
    assert not list(tmp_path.rglob("escape.txt"))


def test_same_file_names_in_several_paths_stay_apart(s3, tmp_path):
    _put(s3, "data/a.csv", "x\n1\n")
    _put(s3, "prog/a.csv", "x\n2\n")
    both = Dataset.File.from_files([(s3, "data/a.csv"), (s3, "prog/a.csv")])
    assert both.to_path() == ["data/a.csv", "prog/a.csv"]
    both.download(tmp_path / "out")
    assert (tmp_path / "out/prog/a.csv").read_text() == "x\n2\n"


def test_download_prefix_is_a_name_prefix(s3, tmp_path):
    _put(s3, "data/sp ace/ü é.csv", "1")
    assert s3.download(tmp_path / "o", prefix="data/sp", show_progress=False) == 1
    assert (tmp_path / "o/data/sp ace/ü é.csv").read_text() == "1"


def test_overwriting_a_fixed_destination_leaves_no_stale_files(workspace, s3, write_script, tmp_path):
    src = write_script("write.py", "import os, sys\nos.makedirs(sys.argv[1], exist_ok=True)\n"
                                   "for n in sys.argv[2:]:\n    open(os.path.join(sys.argv[1], n), 'w').write(n)\n")
    listing = []
    for names in (["f.csv", "old.csv"], ["f.csv"]):
        out = OutputFileDatasetConfig("fixed", destination=(s3, "fixed/{output-name}")).as_upload(overwrite=True)
        step = PythonScriptStep("write.py", name="write", source_directory=src, arguments=[out, *names],
                                allow_reuse=False)
        run = Experiment(workspace, "fixed").submit(Pipeline(workspace, [step]))
        assert run.wait_for_completion(show_output=False) == "Completed"
        listing = Dataset.File.from_files((s3, "fixed/fixed")).to_path()
    assert listing == ["f.csv"]


def test_text_columns_and_azure_encoding_names(workspace):
    store = workspace.get_default_datastore()
    root = Path(store.root)
    (root / "q.csv").write_text('"id","name"\n"1","a"\n')
    df = Dataset.Tabular.from_delimited_files((store, "q.csv"), infer_column_types=False).to_pandas_dataframe()
    assert df["id"].tolist() == ["1"]
    (root / "w.csv").write_bytes("n\ncaf\xe9\n".encode("cp1252"))
    for name in ("iso88591", "windows1252"):
        got = Dataset.Tabular.from_delimited_files((store, "w.csv"), encoding=name).to_pandas_dataframe()
        assert got["n"].tolist() == ["café"]
    (root / "bom.csv").write_bytes(b"\xef\xbb\xbfn\n1\n")
    assert Dataset.Tabular.from_delimited_files((store, "bom.csv"), encoding="utf8bom") \
        .to_pandas_dataframe().columns.tolist() == ["n"]


def test_an_http_dataset_changes_digest_when_the_file_changes(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "t.csv").write_text("a\n1\n")
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/t.csv"
        deadline = time.monotonic() + 20
        while True:  # wait for the server we just started to listen
            try:
                before = Dataset.File.from_files(url).content_digest
                break
            except DatasetError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        (tmp_path / "t.csv").write_text("a\n2\n")  # same size, new bytes
        import os

        os.utime(tmp_path / "t.csv", (time.time() + 5, time.time() + 5))
        assert Dataset.File.from_files(url).content_digest != before
        with pytest.raises(DatasetError, match="does not exist"):
            Dataset.File.from_files(f"http://127.0.0.1:{port}/missing.csv")
    finally:
        server.terminate()
        server.wait()
    with pytest.raises(DatasetError, match="cannot reach|does not exist"):
        Dataset.File.from_files(f"http://127.0.0.1:{port}/t.csv")


def test_consumers_of_a_registered_output_appear_in_lineage(workspace, write_script):
    src = write_script("make.py", "import os, sys\nos.makedirs(sys.argv[1], exist_ok=True)\n"
                                  "open(os.path.join(sys.argv[1], 'v.csv'), 'w').write('v\\n1\\n')\n")
    write_script("use.py", "from cairn import Run\nprint(len(Run.get_context().input_datasets['t']"
                           ".to_pandas_dataframe()))\n")
    out = OutputFileDatasetConfig("made").register_on_complete("made_table")
    make = PythonScriptStep("make.py", name="make", source_directory=src, arguments=[out])
    use = PythonScriptStep("use.py", name="use", source_directory=src,
                           inputs=[out.read_delimited_files().as_input("t")])
    run = Experiment(workspace, "lineage2").submit(Pipeline(workspace, [make, use]))
    assert run.wait_for_completion(show_output=False) == "Completed"
    (version,) = Dataset.get_lineage(workspace, "made_table")
    assert [r["step"] for r in version["consumed_by"]] == ["use"]


def test_bucket_names_are_checked(workspace, moto_s3):
    with pytest.raises(UserInputError, match="not a valid S3 bucket name"):
        Datastore.register_s3_bucket(workspace, "bad", bucket_name="Bad_Bucket", skip_validation=True)
