"""Datasets over Azure Blob (Azurite) and S3 (moto): listing digests, reading, downloading."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from cairn import Dataset, Datastore


@pytest.fixture(params=["azure_blob", "s3"])
def remote(request, workspace, azurite, moto_s3, tmp_path):
    if request.param == "azure_blob":
        store = Datastore.register_azure_blob_container(
            workspace, "blobs", container_name=f"c{uuid.uuid4().hex[:10]}", account_name=azurite["account_name"],
            account_key=azurite["account_key"], endpoint=azurite["endpoint"], protocol="http",
            create_if_not_exists=True)
    else:
        store = Datastore.register_s3_bucket(
            workspace, "bucket", bucket_name=f"b{uuid.uuid4().hex[:10]}", endpoint_url=moto_s3["endpoint_url"],
            access_key_id=moto_s3["access_key_id"], secret_access_key=moto_s3["secret_access_key"],
            create_if_not_exists=True)
    src = tmp_path / "src"
    (src / "tables").mkdir(parents=True)
    (src / "tables" / "one.csv").write_text("x,y\n1,a\n2,b\n")
    (src / "tables" / "two.csv").write_text("x,y\n3,c\n")
    store.upload(src, show_progress=False)
    return store


def test_remote_datasets_read_and_change_digest_with_new_data(remote, workspace, tmp_path):
    table = Dataset.Tabular.from_delimited_files((remote, "tables/*.csv"))
    assert table.to_pandas_dataframe()["x"].tolist() == [1, 2, 3]
    files = Dataset.File.from_files((remote, "tables"))
    before = files.content_digest
    assert files.to_path() == ["one.csv", "two.csv"]
    got = files.download(tmp_path / "dl")
    assert sorted(p.rsplit("/", 1)[-1] for p in got) == ["one.csv", "two.csv"]
    with files.mount() as folder:
        assert sorted(p.name for p in Path(folder).iterdir()) == ["one.csv", "two.csv"]
    registered = files.register(workspace, "tables")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "two.csv").write_text("x,y\n3,c\n4,d\n")
    remote.upload(tmp_path / "new", target_path="tables", overwrite=True, show_progress=False)
    assert Dataset.File.from_files((remote, "tables")).content_digest != before
    assert registered.version == 1
