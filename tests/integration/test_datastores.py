"""Datastores against real servers: Azurite (Azure Blob) and a moto S3 server, on 127.0.0.1."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from cairn import Datastore, UserInputError
from cairn.storage.datastores import DatastoreAccessError


def _tree(root: Path) -> Path:
    files = {"a.txt": "alpha", "sub dir/ünïcode é.csv": "x,y\n1,2\n", "deep/er/b.bin": "b" * 5000}
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def _read_tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def _azure(workspace, azurite, name="blobs", **kw) -> Datastore:
    return Datastore.register_azure_blob_container(
        workspace, name, container_name=f"c{uuid.uuid4().hex[:12]}", account_name=azurite["account_name"],
        account_key=kw.pop("account_key", azurite["account_key"]), endpoint=kw.pop("endpoint", azurite["endpoint"]),
        protocol="http", create_if_not_exists=kw.pop("create_if_not_exists", True), **kw)


def _s3(workspace, moto_s3, name="bucket", **kw) -> Datastore:
    return Datastore.register_s3_bucket(
        workspace, name, bucket_name=f"b{uuid.uuid4().hex[:12]}", endpoint_url=kw.pop("endpoint_url", moto_s3["endpoint_url"]),
        access_key_id=moto_s3["access_key_id"], secret_access_key=moto_s3["secret_access_key"],
        create_if_not_exists=True, **kw)


@pytest.fixture(params=["azure_blob", "s3"])
def store(request, workspace, azurite, moto_s3) -> Datastore:
    return _azure(workspace, azurite) if request.param == "azure_blob" else _s3(workspace, moto_s3)


def test_upload_then_download_round_trips_every_file(store, tmp_path, capsys):
    src = _tree(tmp_path / "src")
    store.upload(src, target_path="train data", show_progress=True)
    assert "uploading to" in capsys.readouterr().out  # a real progress bar was drawn
    assert store.download(tmp_path / "out", prefix="train data", show_progress=False) == 3
    assert _read_tree(tmp_path / "out" / "train data") == _read_tree(src)
    # existing files are skipped unless overwrite=True, on both sides
    (src / "a.txt").write_text("changed")
    store.upload(src, target_path="train data", show_progress=False)
    assert store.download(tmp_path / "again", prefix="train data/a.txt", show_progress=False) == 1
    assert (tmp_path / "again" / "train data" / "a.txt").read_text() == "alpha"
    store.upload(src, target_path="train data", overwrite=True, show_progress=False)
    assert store.download(tmp_path / "again", prefix="train data/a.txt", show_progress=False) == 0
    assert store.download(tmp_path / "again", prefix="train data/a.txt", overwrite=True, show_progress=False) == 1
    assert (tmp_path / "again" / "train data" / "a.txt").read_text() == "changed"


def test_upload_files_keeps_paths_relative_to_the_root(store, tmp_path):
    src = _tree(tmp_path / "src")
    store.upload_files([src / "a.txt", src / "deep/er/b.bin"], relative_root=src, target_path="picked",
                       show_progress=False)
    assert store.download(tmp_path / "out", prefix="picked", show_progress=False) == 2
    assert (tmp_path / "out/picked/deep/er/b.bin").read_text() == "b" * 5000


def test_credentials_are_never_shown_nor_stored_in_clear(workspace, azurite, moto_s3):
    blob = _azure(workspace, azurite)
    s3 = _s3(workspace, moto_s3)
    for ds in (blob, s3, *workspace.datastores.values()):
        assert azurite["account_key"] not in repr(ds) and "testing" not in repr(ds)
    listed = workspace._backend.list_datastores()
    assert azurite["account_key"] not in str(listed) and "testing" not in str(listed)
    db = Path(workspace.location, ".cairn", "cairn.db").read_bytes()
    wal = Path(workspace.location, ".cairn", "cairn.db-wal")
    raw = db + (wal.read_bytes() if wal.exists() else b"")
    assert azurite["account_key"].encode() not in raw
    assert b"secret_access_key" not in raw and b'"testing"' not in raw
    assert workspace.datastores["blobs"].datastore_type == "azure_blob"


def test_a_wrong_key_is_a_clear_error(workspace, azurite):
    with pytest.raises(DatastoreAccessError, match="refused the credentials"):
        _azure(workspace, azurite, name="badkey", account_key="d3Jvbmcga2V5" * 7 + "AA==")
    assert "badkey" not in workspace.datastores  # nothing half-registered


def test_an_unreachable_endpoint_is_a_clear_error(workspace, azurite, moto_s3):
    closed = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(DatastoreAccessError, match="cannot reach"):
        _s3(workspace, moto_s3, name="nowhere", endpoint_url=closed)
    with pytest.raises(DatastoreAccessError, match="cannot reach"):
        _azure(workspace, azurite, name="nowhere", endpoint=f"{closed}/{azurite['account_name']}")


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_missing_paths_and_escapes_are_refused(store, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        store.download(tmp_path / "out", prefix="no/such/prefix", show_progress=False)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        store.upload(tmp_path / "missing", show_progress=False)
    with pytest.raises(UserInputError, match="stay inside"):
        store.upload(_tree(tmp_path / "src"), target_path="../escape", show_progress=False)
    with pytest.raises(UserInputError, match="stay inside"):
        store.path("../../etc")


def test_register_get_unregister(workspace, azurite, moto_s3):
    ds = _s3(workspace, moto_s3)
    assert Datastore.get(workspace, "bucket") == ds
    with pytest.raises(UserInputError, match="already registered"):
        _s3(workspace, moto_s3)
    ds.unregister()
    assert "bucket" not in workspace.datastores
    with pytest.raises(UserInputError, match="default"):
        workspace.get_default_datastore().unregister()
    offline = Datastore.register_s3_bucket(workspace, "later", bucket_name="not-checked",
                                           endpoint_url="http://127.0.0.1:9", skip_validation=True)
    assert offline.datastore_type == "s3"
