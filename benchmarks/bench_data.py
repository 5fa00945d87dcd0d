"""Data benchmarks: listing-digest of 10,000 blobs on Azurite, a 1 GiB hand-off between two local steps,
and download throughput from Azurite and a moto S3 server against the raw fsspec call.

    .venv/bin/python benchmarks/bench_data.py [--repeat 3] [--only many,handoff,download]

Starts Azurite (in memory) and moto_server on free ports of 127.0.0.1 and stops them at the end, also
on an error. Prints a table and writes every raw figure as JSON to ``benchmarks/results/``. See
``benchmarks/README.md``, section "Data benchmarks".
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench_pipelines import machine

from cairn import Dataset, Datastore, Experiment, Pipeline, PipelineData, PythonScriptStep, Workspace
from cairn.core.digests import digest_file
from cairn.engine.client import ensure_agent, stop_agent, sync
from cairn.storage.layout import WorkspaceLayout
from cairn.storage.tree import digest_tree

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
DATA_SOURCE = HERE / "data_src"
PARTS = ("many", "handoff", "download")

AZURITE_ACCOUNT = "devstoreaccount1"
# Azurite's published development key (not a secret)
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
MOTO_KEY = "testing"

MANY_FILES = 10_000
MANY_FILE_BYTES = 300  # "a few hundred bytes"
MANY_FOLDERS = 10  # many/d00 ... many/d09, 1,000 files each
BIG_MIB = 1024  # the hand-off file: 1 GiB
CONTROL_MIB = 1  # ... and the same hand-off with a small file
DOWNLOAD_FILES = 20
DOWNLOAD_FILE_BYTES = 10_000_000  # 20 x 10 MB = 200 MB
DOWNLOAD_RATIO_TARGET = 0.9
MB = 1e6


# -- services: Azurite and moto on 127.0.0.1 ------------------------------------------------

@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(name: str, argv: list[str], folder: Path, port: int, stack: ExitStack,
           env: dict[str, str] | None = None, timeout: float = 60) -> Service:
    folder.mkdir(parents=True)
    log = folder / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=folder,
                                env=env)
    service = Service(name, proc, port, log)
    stack.callback(_stop, service)  # stopped at the end even when it never listened
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {proc.returncode} at start; its log:\n"
                               f"{log.read_text(errors='replace')[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return service
        time.sleep(0.05)  # waiting for a server we started to listen: start-up only
    raise RuntimeError(f"{name} did not listen on 127.0.0.1:{port} within {timeout:.0f} s; log: {log}")


def _stop(service: Service) -> None:
    if service.proc.poll() is not None:
        return
    service.proc.terminate()
    try:
        service.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        service.proc.kill()
        service.proc.wait()


def start_azurite(root: Path, stack: ExitStack) -> dict[str, Any]:
    exe = REPO / "node_modules" / ".bin" / "azurite-blob"
    if not exe.exists():
        raise RuntimeError(f"Azurite is not installed ({exe} is missing): run `bash scripts/setup.sh`")
    port = _free_port()
    # in memory: the emulator's own disk persistence would be measured too (it halves its upload rate)
    _start("azurite", [str(exe), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence",
                       "--skipApiVersionCheck", "--disableTelemetry", "--silent"], root / "azurite", port, stack)
    return {"endpoint": f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}", "port": port}


def start_moto(root: Path, stack: ExitStack) -> dict[str, Any]:
    exe = Path(sys.executable).with_name("moto_server")
    if not exe.exists():
        raise RuntimeError(f"moto_server is not installed next to {sys.executable}: run `bash scripts/setup.sh`")
    port = _free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": MOTO_KEY, "AWS_SECRET_ACCESS_KEY": MOTO_KEY}
    _start("moto", [str(exe), "-H", "127.0.0.1", "-p", str(port)], root / "moto", port, stack, env=env)
    return {"endpoint_url": f"http://127.0.0.1:{port}", "port": port}


def register_blob(ws: Workspace, name: str, azurite: dict[str, Any]) -> Datastore:
    return Datastore.register_azure_blob_container(
        ws, name, container_name=f"c{uuid.uuid4().hex[:12]}", account_name=AZURITE_ACCOUNT, account_key=AZURITE_KEY,
        endpoint=azurite["endpoint"], protocol="http", create_if_not_exists=True)


def register_s3(ws: Workspace, name: str, moto: dict[str, Any]) -> Datastore:
    return Datastore.register_s3_bucket(
        ws, name, bucket_name=f"b{uuid.uuid4().hex[:12]}", endpoint_url=moto["endpoint_url"],
        access_key_id=MOTO_KEY, secret_access_key=MOTO_KEY, create_if_not_exists=True)


# -- scratch folder and workspaces ----------------------------------------------------------

@dataclass
class Bench:
    """The scratch folder of the whole run; every workspace made in it has its agent stopped."""

    root: Path
    layouts: list[WorkspaceLayout] = field(default_factory=list)
    _count: int = 0

    def fresh_dir(self, kind: str) -> Path:
        self._count += 1
        path = self.root / f"{kind}-{self._count:03d}"
        path.mkdir()
        return path

    def fresh_workspace(self, warm_agent: bool = False) -> Workspace:
        ws = Workspace.create(self.fresh_dir("ws"))
        layout = WorkspaceLayout(ws.location)
        self.layouts.append(layout)
        if warm_agent:
            ensure_agent(layout)
            sync(layout)
        return ws

    def close(self) -> None:
        for layout in self.layouts:
            stop_agent(layout)  # False, at once, when none runs


@contextmanager
def bench_root(keep: bool) -> Iterator[Bench]:
    bench = Bench(Path(tempfile.mkdtemp(prefix="cairn-bench-data-")))
    try:
        yield bench
    finally:
        bench.close()
        if keep:
            print(f"kept {bench.root}", file=sys.stderr)
        else:
            shutil.rmtree(bench.root, ignore_errors=True)


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    # Every measurement starts from a collected heap: otherwise a full collection of the garbage that
    # earlier ones left (each new S3 filesystem leaves a botocore client in reference cycles) lands in
    # a random one and costs it ~0.15 s. The collector stays on during the measurement.
    gc.collect()
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def _say(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


# -- 1. 10,000 small blobs: register and digest from the listing ----------------------------

def bench_many(bench: Bench, azurite: dict[str, Any], repeat: int, files: int) -> dict[str, Any]:
    src = bench.fresh_dir("many-src")
    per_folder = max(1, files // MANY_FOLDERS)
    for i in range(files):
        folder = src / f"d{i // per_folder:02d}"
        folder.mkdir(exist_ok=True)
        (folder / f"f{i:05d}.txt").write_bytes(os.urandom(MANY_FILE_BYTES // 2).hex().encode())
    ws = bench.fresh_workspace()
    store = register_blob(ws, "blobs", azurite)
    _say(f"uploading {files:,} files of {MANY_FILE_BYTES} bytes to Azurite")
    upload_s, _ = _timed(lambda: store.upload(src, target_path="many", overwrite=True, show_progress=False))
    _say(f"uploaded in {upload_s:.1f} s")
    reps = []
    for i in range(repeat):
        # a fresh workspace each time, so that every registration is a first one (version 1)
        rws = ws if i == 0 else bench.fresh_workspace()
        rstore = store if i == 0 else Datastore.register_azure_blob_container(
            rws, "blobs", container_name=store._location().config["container_name"], account_name=AZURITE_ACCOUNT,
            account_key=AZURITE_KEY, endpoint=azurite["endpoint"], protocol="http")
        from_files_s, ds = _timed(lambda s=rstore: Dataset.File.from_files((s, "many/")))
        register_s, registered = _timed(lambda d=ds, w=rws: d.register(w, "many"))
        digest_s, digest = _timed(lambda d=ds: d.content_digest)
        row = registered._registration
        if row["file_count"] != files or row["version"] != 1 or digest != row["content_digest"]:
            raise RuntimeError(f"registration of {files} blobs went wrong: {row['file_count']} files, version "
                               f"{row['version']}, digest again {digest} vs {row['content_digest']}")
        # the floor: the same listing with the raw fsspec call, on a filesystem built as Cairn builds it
        loc = rstore._location()
        raw_s, listing = _timed(lambda loc=loc: loc.filesystem()[0].find(
            f"{loc.config['container_name']}/many", detail=True))
        if len(listing) != files:
            raise RuntimeError(f"raw listing found {len(listing)} blobs, not {files}")
        reps.append({"from_files_s": from_files_s, "register_s": register_s, "total_s": from_files_s + register_s,
                     "content_digest_s": digest_s, "raw_find_s": raw_s})
        _say(f"many {i + 1}/{repeat}: from_files {from_files_s:.2f} s + register {register_s:.2f} s; "
             f"content_digest {digest_s:.2f} s; raw fs.find {raw_s:.2f} s")
    return {"files": files, "file_bytes": MANY_FILE_BYTES, "upload_s": upload_s, "reps": reps}


# -- 2. a 1 GiB output handed from one local step to the next -------------------------------

def disk_usage(path: Path) -> int:
    """Allocated bytes under ``path``, each inode once (what ``du -s --block-size=1`` says)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [*dirnames, *filenames]:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:  # the agent's socket or a temporary file came and went
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def _events(step: Any) -> dict[str, float]:
    return {e["status"]: datetime.fromisoformat(e["time"]).timestamp() for e in step.get_details()["events"]}


def bench_handoff(bench: Bench, source: Path, mib: int) -> dict[str, Any]:
    ws = bench.fresh_workspace(warm_agent=True)
    try:
        big = PipelineData("big")
        seen = PipelineData("seen")
        write = PythonScriptStep("write_big.py", name="write_big", source_directory=str(source),
                                 arguments=["--out", big, "--mib", str(mib)], outputs=[big])
        read = PythonScriptStep("read_head.py", name="read_head", source_directory=str(source),
                                arguments=["--in", big.as_input(), "--out", seen], outputs=[seen])
        pipeline = Pipeline(ws, [write, read], description=f"bench: {mib} MiB hand-off")
        du_before = disk_usage(Path(ws.location))
        started = time.perf_counter()
        run = Experiment(ws, "bench-handoff").submit(pipeline, regenerate_outputs=True)
        run.wait_for_completion(show_output=False)
        pipeline_s = time.perf_counter() - started
        du_after = disk_usage(Path(ws.location))
        steps = {s.name: s for s in run.get_steps()}
        if run.status != "Completed" or any(s.status != "Completed" for s in steps.values()):
            raise RuntimeError(f"hand-off run {run.id} is {run.status}: "
                               f"{ {n: s.status for n, s in steps.items()} }")
        committed = steps["write_big"].get_output_data("big").local_path
        written = json.loads((committed / "written.json").read_text())
        seen_info = json.loads((steps["read_head"].get_output_data("seen").local_path / "seen.json").read_text())
        big_file = committed / "big.bin"
        st = os.stat(big_file)
        with open(big_file, "rb") as f:
            head = f.read(16).hex()
        same_file = (written["ino"], written["dev"]) == (st.st_ino, st.st_dev) == (seen_info["ino"], seen_info["dev"])
        if st.st_size != mib << 20 or seen_info["size"] != st.st_size or seen_info["head"] != head:
            raise RuntimeError(f"the hand-off file is wrong: {st.st_size} bytes committed, B saw {seen_info}")
        at = _events(steps["write_big"])
        commit_s = at["Completed"] - written["ended"]  # script's last line -> Completed (digest, rename, record)
        # the digest Cairn computed during the commit, measured again here on the same (page-cached) file
        digest_s, tree = _timed(lambda: digest_tree(committed))
        recorded = steps["write_big"].get_output_data("big")
        if recorded.digest != tree.digest:
            raise RuntimeError(f"the recorded digest {recorded.digest} is not the file's {tree.digest}")
        read_at = _events(steps["read_head"])
        return {
            "mib": mib, "pipeline_s": pipeline_s, "write_s": written["write_s"],
            # outputs handed over before they are digested: B starts while A digests (negative: before
            # A's Completed)
            "b_running_after_a_script_s": read_at["Running"] - written["ended"],
            "b_running_minus_a_completed_s": read_at["Running"] - at["Completed"],
            "commit_s": commit_s, "finalizing_to_completed_s": at["Completed"] - at["Finalizing"]
            if "Finalizing" in at else None,
            "digest_s": digest_s, "commit_minus_digest_s": commit_s - digest_s,
            "du_before": du_before, "du_after": du_after, "du_growth": du_after - du_before,
            "allocated": written["allocated"], "same_inode": same_file, "inode": st.st_ino, "nlink": st.st_nlink,
            "b_input_path": seen_info["path"], "committed_path": str(big_file), "b_input_mode": seen_info["mode"],
        }
    finally:
        stop_agent(WorkspaceLayout(ws.location))
        shutil.rmtree(ws.location, ignore_errors=True)  # 1 GiB per repetition


# -- 3. download throughput against the raw fsspec call -------------------------------------

def _check_download(folder: Path, sources: dict[str, str], full: bool) -> int:
    """Every file arrived with its size (and, when ``full``, its bytes); returns the bytes."""
    got = {p.name: p for p in folder.rglob("*") if p.is_file()}
    if sorted(got) != sorted(sources):
        raise RuntimeError(f"downloaded {sorted(got)[:3]}... ({len(got)} files), expected {len(sources)} files")
    total = 0
    for name, path in got.items():
        total += path.stat().st_size
        if full and digest_file(path) != sources[name]:
            raise RuntimeError(f"downloaded {name} differs from the uploaded file")
    return total


def bench_download(bench: Bench, services: dict[str, dict[str, Any]], repeat: int) -> dict[str, Any]:
    src = bench.fresh_dir("dl-src")
    sources = {}
    for i in range(DOWNLOAD_FILES):
        path = src / f"part-{i:02d}.bin"
        path.write_bytes(os.urandom(DOWNLOAD_FILE_BYTES))
        sources[path.name] = digest_file(path)
    ws = bench.fresh_workspace()
    stores = {}
    if "azurite" in services:
        stores["azure_blob (Azurite)"] = register_blob(ws, "blobs", services["azurite"])
    if "moto" in services:
        stores["s3 (moto)"] = register_s3(ws, "bucket", services["moto"])
    out: dict[str, Any] = {"files": DOWNLOAD_FILES, "file_bytes": DOWNLOAD_FILE_BYTES, "stores": {}}
    for label, store in stores.items():
        upload_s, _ = _timed(lambda s=store: s.upload(src, target_path="dl", overwrite=True, show_progress=False))
        loc = store._location()
        remote = f"{loc.filesystem()[1]}/dl"

        def cairn_download(dest: Path, s: Datastore = store) -> int:
            return s.download(dest, prefix="dl", overwrite=False, show_progress=False)

        def raw_get(dest: Path, loc: Any = loc, remote: str = remote) -> None:
            fs, _root = loc.filesystem()  # the same settings as Cairn's (built by the same function)
            fs.get(remote, str(dest), recursive=True)

        ways: dict[str, Callable[[Path], Any]] = {"cairn": cairn_download, "raw": raw_get}
        # unrecorded warm-up (connections, imports, the emulator's caches), which checks every byte
        for way, fn in ways.items():
            dest = bench.fresh_dir(f"dl-{way}")
            fn(dest)
            _check_download(dest, sources, full=True)
            shutil.rmtree(dest)
        times: dict[str, list[float]] = {w: [] for w in ways}
        for i in range(repeat):
            order = list(ways) if i % 2 == 0 else list(reversed(ways))  # neither side always goes first
            for way in order:
                dest = bench.fresh_dir(f"dl-{way}")
                seconds, _ = _timed(lambda fn=ways[way], d=dest: fn(d))
                total = _check_download(dest, sources, full=False)
                shutil.rmtree(dest)
                times[way].append(seconds)
            _say(f"download {label} {i + 1}/{repeat}: Cairn {times['cairn'][-1]:.2f} s, raw {times['raw'][-1]:.2f} s")
        out["stores"][label] = {"upload_s": upload_s, "bytes": total, "cairn_s": times["cairn"],
                                "raw_s": times["raw"]}
    return out


# -- the whole benchmark -------------------------------------------------------------------

def summarise(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of (part, measurement, median seconds, fastest-slowest, rate, value, target, met)."""
    rows: list[dict[str, Any]] = []

    def row(part: str, what: str, samples: list[float] | None, amount: float = 0, unit: str = "",
            value: str = "", target: str = "", met: bool | None = None) -> float | None:
        """``amount`` per second of the median, in ``unit`` (files, or bytes shown as MB/s)."""
        seconds = statistics.median(samples) if samples else None
        rate = ""
        if seconds and amount:
            rate = f"{amount / seconds:,.0f} files/s" if unit == "files" else f"{amount / seconds / MB:,.0f} MB/s"
        rows.append({"part": part, "measurement": what, "seconds": seconds,
                     "range": [min(samples), max(samples)] if samples else None, "rate": rate, "value": value,
                     "target": target, "met": met})
        return seconds

    if "many" in raw:
        m = raw["many"]
        n = m["files"]

        def per(key: str) -> list[float]:
            return [r[key] for r in m["reps"]]

        part = f"1. {n:,} blobs of {m['file_bytes']} B on Azurite"
        row(part, "upload (Datastore.upload, overwrite=True; set-up)", [m["upload_s"]], n, "files")
        row(part, "Dataset.File.from_files((store, 'many/'))", per("from_files_s"), n, "files")
        row(part, ".register(ws, 'many')", per("register_s"), n, "files")
        row(part, "from_files + register", per("total_s"), n, "files")
        row(part, "content_digest again (unchanged)", per("content_digest_s"), n, "files")
        row(part, "raw fs.find of the same prefix (the floor)", per("raw_find_s"), n, "files")
    if "handoff" in raw:
        h = raw["handoff"]
        size = h[0]["mib"] << 20
        part = f"2. {h[0]['mib']} MiB output handed from step A to step B (local)"

        def per(key: str) -> list[float]:
            return [r[key] for r in h]

        row(part, "whole pipeline (submit -> wait returned)", per("pipeline_s"))
        row(part, "A writes the file (inside the script)", per("write_s"), size)
        row(part, "A's commit: script end -> Completed", per("commit_s"), size)
        row(part, "  of which the output digest (reads it once)", per("digest_s"), size)
        control = [r["commit_s"] for r in raw.get("handoff_control", [])]
        if control:
            row(part, f"  the same commit of a {CONTROL_MIB} MiB file (control)", control)
        if "b_running_after_a_script_s" in h[0]:
            row(part, "B runs, after A's script ended", per("b_running_after_a_script_s"))
            early = [r["b_running_minus_a_completed_s"] for r in h]
            row(part, "B runs, relative to A's Completed", None,
                value=f"{statistics.median(early):+.3f} s", target="< 0 (handed over before the digest)",
                met=statistics.median(early) < 0)
        same = all(r["same_inode"] for r in h)
        row(part, "B's input is A's committed file (same inode)", None, value="yes" if same else "NO",
            target="same inode", met=same)
        growth = statistics.median(per("du_growth"))
        one_copy = all(r["du_growth"] < 1.5 * size for r in h)
        row(part, "workspace disk usage growth (du)", None,
            value=f"{growth / 2**30:.3f} GiB = {growth / size:.2f} x file", target="1 copy", met=one_copy)
    if "download" in raw:
        d = raw["download"]
        for label, s in d["stores"].items():
            part = f"3. download {d['files']} x {d['file_bytes'] / MB:g} MB from {label}"
            raw_s = row(part, "raw fs.get(remote, local, recursive=True)", s["raw_s"], s["bytes"])
            cairn_s = statistics.median(s["cairn_s"])
            ratio = raw_s / cairn_s if raw_s else 0.0  # Cairn's throughput over the raw call's
            row(part, "Datastore.download(local, prefix=...)", s["cairn_s"], s["bytes"], value=f"{ratio:.2f} x raw",
                target=f">= {DOWNLOAD_RATIO_TARGET} x raw", met=ratio >= DOWNLOAD_RATIO_TARGET)
    return rows


def print_report(rows: list[dict[str, Any]], info: dict[str, Any], repeat: int) -> None:
    print(f"\n{info['nproc']} cores, {info['cpu_model']}, Python {info['python']}; median of {repeat} "
          f"(range: fastest - slowest)")
    part = None
    for r in rows:
        if r["part"] != part:
            part = r["part"]
            print(f"\n{part}")
            print(f"  {'measurement':48} {'seconds':>8} {'range':>15} {'rate':>15}  {'value':>24}  "
                  f"{'target':>12}  met")
        met = "" if r["met"] is None else ("yes" if r["met"] else "NO")
        seconds = f"{r['seconds']:.3f}" if r["seconds"] is not None else ""
        spread = f"{r['range'][0]:.3f}-{r['range'][1]:.3f}" if r["range"] and r["range"][0] != r["range"][1] else ""
        print(f"  {r['measurement']:48} {seconds:>8} {spread:>15} {r['rate']:>15}  {r['value']:>24}  "
              f"{r['target']:>12}  {met}")


def run_all(args: argparse.Namespace, parts: list[str]) -> dict[str, Any]:
    raw: dict[str, Any] = {}
    with ExitStack() as stack:
        bench = stack.enter_context(bench_root(args.keep))
        if "many" in parts:
            with ExitStack() as own:  # an emulator of its own: its 10,000 blobs stay out of part 3
                raw["many"] = bench_many(bench, start_azurite(bench.root / "azurite-many", own), args.repeat,
                                         args.files)
        if "handoff" in parts:
            source = bench.root / "data_src"
            shutil.copytree(DATA_SOURCE, source)  # outside any git work tree, as bench_pipelines.py does
            raw["handoff"], raw["handoff_control"] = [], []
            for i in range(args.repeat):
                raw["handoff"].append(bench_handoff(bench, source, args.mib))
                r = raw["handoff"][-1]
                # the same pipeline with a 1 MiB file: what a commit costs apart from reading the bytes
                raw["handoff_control"].append(bench_handoff(bench, source, CONTROL_MIB))
                _say(f"hand-off {i + 1}/{args.repeat}: write {r['write_s']:.2f} s, commit {r['commit_s']:.2f} s "
                     f"(digest {r['digest_s']:.2f} s; {CONTROL_MIB} MiB: "
                     f"{raw['handoff_control'][-1]['commit_s']:.3f} s), du +{r['du_growth'] / 2**30:.3f} GiB, "
                     f"same inode {r['same_inode']}")
        if "download" in parts:
            services = {"azurite": start_azurite(bench.root / "azurite-download", stack),
                        "moto": start_moto(bench.root / "moto-download", stack)}
            raw["download"] = bench_download(bench, services, args.repeat)
    return raw


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # so that the services and agents are stopped on the way out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="repetitions; medians are reported (default 3)")
    parser.add_argument("--only", default=",".join(PARTS), help="comma-separated subset of: " + ", ".join(PARTS))
    parser.add_argument("--files", type=int, default=MANY_FILES, help=f"part 1's blob count (default {MANY_FILES})")
    parser.add_argument("--mib", type=int, default=BIG_MIB, help=f"part 2's file size in MiB (default {BIG_MIB})")
    parser.add_argument("--json", type=Path, default=None, help="where to write the results (default: "
                        "benchmarks/results/data-<time>.json)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    if args.repeat < 1 or not parts or set(parts) - set(PARTS):
        parser.error(f"--repeat must be >= 1 and --only a subset of {', '.join(PARTS)}")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    info = machine()
    if info["loadavg_at_start"][0] > 0.5:
        print(f"warning: load average {info['loadavg_at_start'][0]:.2f}: something else is running, the "
              f"figures will be noisy", file=sys.stderr)
    started = datetime.now(UTC)
    wall = time.perf_counter()
    raw = run_all(args, parts)
    info["wall_s"] = time.perf_counter() - wall
    rows = summarise(raw)
    print_report(rows, info, args.repeat)
    print(f"\nwhole benchmark: {info['wall_s']:.0f} s")
    out = args.json or RESULTS / f"data-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"started": started.isoformat(), "repeat": args.repeat, "machine": info, "summary": rows, "raw": raw}, indent=2) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
