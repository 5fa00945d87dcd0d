"""Prefect 3: one @task per step in one @flow on a ThreadPoolTaskRunner(max_workers=2), run locally
against Prefect's ephemeral API (a temporary local server on a SQLite database under the state folder).

Reuse is Prefect's own task caching: cache_policy=INPUTS + TASK_SOURCE, where the inputs are the step's
name, a digest of its step.py, and the upstream tasks' results ``(out folder, digest of its files)``;
results and cache records persist under ``<state>/prefect`` so repetitions do not share caches.
"""

import argparse
import hashlib
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--shape", required=True, choices=common.SHAPES)
parser.add_argument("--state", required=True, type=Path)
args = parser.parse_args()
state = args.state.resolve()

# Settings before Prefect is imported: offline, quiet, everything under the state folder.
os.environ.pop("PREFECT_API_URL", None)
os.environ.update(
    PREFECT_HOME=str(state / "prefect"),
    PREFECT_LOCAL_STORAGE_PATH=str(state / "prefect" / "storage"),
    PREFECT_SERVER_EPHEMERAL_ENABLED="true",  # no PREFECT_API_URL: a temporary local server per process
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",  # it takes ~16 s here; the default is 20
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    DO_NOT_TRACK="1",
    PREFECT_LOGGING_LEVEL="WARNING",
    # the temporary server, stopped at exit, logs its cancelled event flushes as errors: noise only
    PREFECT_SERVER_LOGGING_LEVEL="CRITICAL",
    PREFECT_UI_ENABLED="false",
)

from prefect import flow, task  # noqa: E402
from prefect.cache_policies import INPUTS, TASK_SOURCE  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.futures import wait  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402


def digest_folder(folder: str) -> str:
    """What downstream caching keys on: each output file's name, size and first 64 KiB."""
    h = hashlib.blake2b(digest_size=16)
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        with open(path, "rb") as f:
            h.update(f"{entry}:{os.path.getsize(path)}:".encode() + f.read(1 << 16))
    return h.hexdigest()


@task(cache_policy=INPUTS + TASK_SOURCE, persist_result=True, task_run_name="{name}")
def step(name: str, script_digest: str, upstream: list[tuple[str, str]]) -> tuple[str, str]:
    out = common.data_dir(state, name)
    subprocess.run(common.step_argv(state, name, [folder for folder, _ in upstream], out), check=True)
    return out, digest_folder(out)


@flow(name=f"bench-{args.shape}", task_runner=ThreadPoolTaskRunner(max_workers=common.PARALLELISM),
      persist_result=False, log_prints=False)
def pipeline(shape: str) -> None:
    futures = {}
    for name, ups in common.graph(shape):
        script = common.step_script(state, name).read_bytes()
        futures[name] = step.submit(name, hashlib.blake2b(script, digest_size=16).hexdigest(),
                                    [futures[u] for u in ups])
    wait(list(futures.values()))
    for future in futures.values():
        future.result()  # raises if any step failed


common.prepare_scripts(state, args.shape)
# What a user does once: have an API up (here the ephemeral local server, started now, not timed).
with get_client(sync_client=True) as client:
    client.api_healthcheck()
ran_log = state / "ran.log"
before = len(ran_log.read_text().splitlines()) if ran_log.exists() else 0
with common.Timer() as t:
    pipeline(args.shape)
ran = (len(ran_log.read_text().splitlines()) if ran_log.exists() else 0) - before
note = ""
if args.shape == "rerun":
    note = "Prefect task cache: nothing rerun" if ran == 0 else f"Prefect task cache: {ran} steps reran"
elif args.shape == "edit":
    note = f"Prefect task cache: {ran} steps ran (steps 10 to 20 expected: 11)"
common.report(t.seconds, note)
