"""The environment cache: one build per build digest across threads and processes, nothing
half-made left by a failed or interrupted build, pruning that spares what is needed or in use,
and Cairn's client reachable from inside an environment without leaking the agent's packages."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from cairn.environments.build import MARKER, EnvironmentBuildError, EnvironmentCache
from cairn.environments.spec import cache_key, managed_spec


def empty_env(tag: str = "a") -> dict[str, Any]:
    """An environment with no packages (built offline); the index URL only makes its key differ."""
    return managed_spec(python=None, pip=[], conda=[], channels=[], index_url=f"https://example.org/{tag}",
                        extra_index_urls=[])


def run_in(resolved: Any, code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(resolved.step_variables())
    return subprocess.run([resolved.python, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def test_threads_that_need_the_same_environment_build_it_once(tmp_path: Path) -> None:
    cache = EnvironmentCache(tmp_path / "envs")
    spec = empty_env()
    results: list[Any] = []
    barrier = threading.Barrier(4)

    def resolve() -> None:
        barrier.wait()
        results.append(cache.resolve(spec, "shared"))

    threads = [threading.Thread(target=resolve) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4
    assert sum(r.built_now for r in results) == 1
    assert len({r.python for r in results}) == 1
    log = (cache.folder(cache_key(spec)) / "build.log").read_text()
    assert log.count("building environment 'shared'") == 1
    for r in results:
        r.close()


def test_processes_that_need_the_same_environment_build_it_once(tmp_path: Path) -> None:
    script = (
        "import json, sys\n"
        "from cairn.environments.build import EnvironmentCache\n"
        "spec = json.loads(sys.argv[2])\n"
        "print(EnvironmentCache(sys.argv[1]).resolve(spec, 'shared').built_now)\n")
    spec = json.dumps(empty_env())
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "envs"), spec], stdout=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert sorted(outputs) == ["False", "False", "True"]


def test_a_failed_build_leaves_nothing_a_later_step_could_pick_up(tmp_path: Path) -> None:
    cache = EnvironmentCache(tmp_path / "envs")
    spec = empty_env()
    spec["python"] = "3.1"  # no such interpreter, and none to download here
    lines: list[str] = []
    with pytest.raises(EnvironmentBuildError, match="creating a Python 3.1 environment .*failed"):
        cache.resolve(spec, "broken", lines.append)
    key = cache_key(spec)
    assert not cache.folder(key).exists() and not cache.is_built(key)
    assert any("building environment 'broken'" in line for line in lines)  # the log was streamed
    assert cache.entries() == []


def test_an_interrupted_build_is_cleared_and_redone(tmp_path: Path) -> None:
    cache = EnvironmentCache(tmp_path / "envs")
    spec = empty_env()
    leftover = cache.folder(cache_key(spec))
    (leftover / "venv" / "bin").mkdir(parents=True)  # what a killed build left: no env.json
    (leftover / "venv" / "bin" / "python").write_text("not an interpreter")
    resolved = cache.resolve(spec, "again")
    assert resolved.built_now
    assert run_in(resolved, "print('ok')").stdout.strip() == "ok"
    resolved.close()


def test_steps_import_cairn_from_the_environment_but_not_the_agents_packages(tmp_path: Path) -> None:
    resolved = EnvironmentCache(tmp_path / "envs").resolve(empty_env(), "isolated")
    code = ("import sys, cairn, sqlalchemy; print(sys.prefix); print(cairn.__file__)\n"
            "try:\n    import pandas\n    print('pandas leaked')\nexcept ImportError:\n    print('isolated')\n")
    out = run_in(resolved, code)
    assert out.returncode == 0, out.stderr
    prefix, cairn_file, isolation = out.stdout.split()
    assert prefix == str(resolved.folder / "venv")
    assert cairn_file.startswith(resolved.client_path)
    assert isolation == "isolated"
    # without CAIRN_CLIENT_PATH the environment is exactly what was asked for
    plain = subprocess.run([resolved.python, "-c", "import cairn"], capture_output=True, text=True,
                           env={"PATH": os.environ["PATH"]})
    assert plain.returncode != 0
    resolved.close()


def test_a_changed_cairn_client_adds_a_client_folder_beside_the_old_one(tmp_path: Path) -> None:
    cache = EnvironmentCache(tmp_path / "envs")
    first = cache.resolve(empty_env(), "refresh")
    first.close()
    marker = (first.folder / MARKER).read_text()
    older = first.folder / "cairn-client-of-an-older-cairn"
    Path(first.client_path).rename(older)  # as if this environment had been built by another version
    lines: list[str] = []
    again = cache.resolve(empty_env(), "refresh", lines.append)
    assert not again.built_now and again.client_path == first.client_path
    assert any("refreshing Cairn's client" in line for line in lines)
    assert (first.folder / MARKER).read_text() == marker
    assert older.is_dir()  # a step that started with it keeps it
    assert run_in(again, "import cairn").returncode == 0
    again.close()


def test_uv_settings_of_the_machine_do_not_change_a_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "uv.toml").write_text("this is = not valid toml [[[\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("UV_OVERRIDE", str(tmp_path / "missing-overrides.txt"))
    monkeypatch.setenv("UV_INDEX_URL", "http://127.0.0.1:9/simple")
    resolved = EnvironmentCache(tmp_path / "envs").resolve(empty_env(), "clean")
    assert run_in(resolved, "import pip; print('pip', pip.__version__)").stdout.startswith("pip ")  # seeded
    resolved.close()


def test_prune_spares_needed_and_busy_environments(tmp_path: Path) -> None:
    cache = EnvironmentCache(tmp_path / "envs")
    specs = {tag: empty_env(tag) for tag in ("needed", "busy", "idle")}
    for tag, spec in specs.items():
        cache.resolve(spec, tag).close()
    half_made = cache.root / "0123456789abcdef01234567"
    half_made.mkdir()
    failed = "fedcba9876543210fedcba98"  # a build that failed: its lock files, no folder
    for kind in ("build", "use"):
        (cache.root / f"{failed}.{kind}.lock").touch()
    busy = cache.resolve(specs["busy"], "busy")  # a step is using it
    keys = {tag: cache_key(spec) for tag, spec in specs.items()}
    assert {e["name"] for e in cache.entries()} == {"needed", "busy", "idle"}
    removed, kept = cache.prune({keys["needed"]}, dry_run=True)
    assert cache.is_built(keys["idle"]) and keys["idle"] in removed
    removed, kept = cache.prune({keys["needed"]})
    assert sorted(removed) == sorted([keys["idle"], half_made.name, failed]) and kept == [keys["busy"]]
    assert not cache.folder(keys["idle"]).exists() and not half_made.exists()
    assert not list(cache.root.glob(f"{failed}.*")) and not list(cache.root.glob(f"{keys['idle']}.*"))
    assert cache.is_built(keys["needed"]) and cache.is_built(keys["busy"])
    busy.close()
    removed, _ = cache.prune(set())
    assert sorted(removed) == sorted([keys["needed"], keys["busy"]])
    assert cache.entries() == []


def test_a_step_waiting_for_another_builder_can_be_canceled(tmp_path: Path) -> None:
    cache = EnvironmentCache(tmp_path / "envs")
    spec = empty_env()
    cache.root.mkdir(parents=True)
    with open(cache.root / f"{cache_key(spec)}.build.lock", "ab") as other_builder:
        fcntl.flock(other_builder, fcntl.LOCK_EX)
        lines: list[str] = []
        with pytest.raises(EnvironmentBuildError, match="canceled"):
            cache.resolve(spec, "waiting", lines.append, canceled=lambda: True)
    assert any("being built by another step" in line for line in lines)


def test_credentials_in_index_urls_never_reach_the_build_log(tmp_path: Path) -> None:
    from cairn.environments.build import redact

    assert redact("uv pip install --index-url https://me:s3cret@pkgs.example.org/simple") == \
        "uv pip install --index-url https://***@pkgs.example.org/simple"
    assert redact("--extra-index-url https://token@host/simple x") == "--extra-index-url https://***@host/simple x"


def test_without_the_package_index_an_environment_builds_from_uvs_cache(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine that cannot reach the index (here: a proxy nobody listens on) builds from what uv
    has cached, saying so; the seed packages are in the cache once any environment was built."""
    cache = EnvironmentCache(tmp_path / "envs")
    cache.resolve(empty_env("online"), "online").close()  # the seed packages are cached now
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    lines: list[str] = []
    resolved = cache.resolve(empty_env("offline"), "offline", lines.append)
    try:
        assert run_in(resolved, "import pip, sys; print(sys.prefix)").returncode == 0
    finally:
        resolved.close()
    assert any("trying again from uv's cache alone" in line for line in lines), lines
    assert any("done from uv's cache" in line for line in lines), lines
