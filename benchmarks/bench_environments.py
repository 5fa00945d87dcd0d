"""Environment benchmarks: resolving an already-built environment for a step (target: under
50 ms), and a cold build of the curated ``cairn-sklearn`` environment with a warm uv cache.

    .venv/bin/python benchmarks/bench_environments.py [--repeat 5]

The first build warms uv's cache (downloads, if any, happen there and are not timed); each timed
build then goes into a fresh, empty environment cache. Prints a table and writes the raw figures
as JSON to ``benchmarks/results/``. See ``benchmarks/README.md``, section "Environment benchmarks".
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench_pipelines import machine

from cairn.client.environment import Environment
from cairn.environments.build import EnvironmentCache


def cold_build(spec: dict, root: Path) -> float:
    started = time.perf_counter()
    EnvironmentCache(root).resolve(spec, "cairn-sklearn").close()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    from cairn.environments.curated import curated_definition

    spec = Environment._from_definition(curated_definition("cairn-sklearn"), 1).to_spec()
    with tempfile.TemporaryDirectory(prefix="cairn-bench-env-") as tmp:
        warm_up = cold_build(spec, Path(tmp) / "warm-up")  # fills uv's cache; not a figure
        builds = [cold_build(spec, Path(tmp) / f"cold-{i}") for i in range(args.repeat)]
        cache = EnvironmentCache(Path(tmp) / "cold-0")
        resolves = []
        for _ in range(max(50, args.repeat)):
            started = time.perf_counter()
            cache.resolve(spec, "cairn-sklearn").close()
            resolves.append(time.perf_counter() - started)
    result = {
        "machine": machine(), "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "warm_up_build_s": warm_up, "cold_build_s": builds, "resolve_built_s": resolves,
    }
    print(f"{'measure':52} {'median':>10} {'min':>10} {'max':>10}")
    for label, values, unit, scale in (("resolve an already-built environment (target < 50 ms)", resolves, "ms", 1e3),
                                       ("cold build of cairn-sklearn, warm uv cache", builds, "s", 1)):
        print(f"{label:52} {statistics.median(values) * scale:>8.2f}{unit:>2} {min(values) * scale:>8.2f}{unit:>2} "
              f"{max(values) * scale:>8.2f}{unit:>2}")
    print(f"(first build, filling uv's cache: {warm_up:.2f} s)")
    out = Path(__file__).parent / "results" / f"environments-{int(time.time())}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"raw figures: {out}")


if __name__ == "__main__":
    main()
