"""The record of what steps inherit from their agent's variables (``runner/inherited.py``)."""

from __future__ import annotations

import threading
from pathlib import Path

from cairn.runner.inherited import load, looks_secret, record, value_digest


def test_steps_starting_together_share_one_whole_record(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin", "HOME": "/root", "API_KEY": "k"}
    ids: list[str] = []
    errors: list[BaseException] = []

    def keep() -> None:
        try:
            ids.append(record(tmp_path, env))
        except BaseException as exc:  # noqa: BLE001 - the test reports any
            errors.append(exc)

    threads = [threading.Thread(target=keep) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(ids)) == 1
    variables, salt = load(tmp_path, ids[0])
    assert variables["PATH"] == "/usr/bin" and variables["API_KEY"] == {"digest": value_digest("API_KEY", "k", salt)}
    assert sorted(p.name for p in (tmp_path / "inherited").iterdir()) == [f"{ids[0]}.json", "id-key"]  # no temporary
    assert record(tmp_path, {**env, "API_KEY": "other"}) != ids[0]  # another secret value: another record
    assert oct((tmp_path / "inherited" / f"{ids[0]}.json").stat().st_mode & 0o777) == "0o600"


def test_what_looks_secret_by_name_or_value() -> None:
    for name, value in [("DATABASE_URL", "sqlite:///x"), ("AZURE_STORAGE_CONNECTION_STRING", "x"), ("GH_PAT", "x"),
                        ("HTTPS_PROXY", "http://proxy"), ("X", "postgres://u:pw@db/x"), ("Y", "AccountKey=abc"),
                        ("Z", "https://a.blob.core.windows.net/c?sv=1&sig=abc"),
                        ("APP_JSON", '{"db": {"password": "pw"}}'), ("MYSQL_CMD", "mysql -uroot --password=pw"),
                        ("HEADER", "Basic dXNlcjpwYXNzMTcx"), ("REPO", "https://ghp_abc123@github.com/o/r.git")]:
        assert looks_secret(name, value), name
    for name, value in [("PATH", "/usr/bin"), ("HOME", "/root"), ("PYTHONPATH", "/lib"), ("LANG", "C.UTF-8"),
                        ("PWD", "/work"), ("OLDPWD", "/tmp"), ("PYTHONPATH", "/opt/tokenizers/lib"),
                        ("PATH", "/home/u/secret-tools/bin:/usr/bin")]:
        assert not looks_secret(name, value), name


def test_a_missing_or_bad_record_is_none(tmp_path: Path) -> None:
    assert load(tmp_path, "0" * 32) is None
    assert load(tmp_path, "../../etc/passwd") is None
