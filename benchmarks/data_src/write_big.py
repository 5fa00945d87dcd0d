"""Step A of the hand-off benchmark: write one file of ``--mib`` MiB of real bytes into ``--out``.

The bytes are written with a few large writes (a 64 MiB random block, again and again), so the
file has no sparse regions: digesting it really reads 1 GiB. ``written.json`` beside it says how
long the writes took, the file's inode and when the script ended (wall clock), so that the
benchmark can time Cairn's commit from the script's end to the step's ``Completed``.
"""

import json
import os
import sys
import time

BLOCK = 64 << 20


def main(argv: list[str]) -> int:
    out, mib = argv[argv.index("--out") + 1], int(argv[argv.index("--mib") + 1])
    block = memoryview(os.urandom(BLOCK))
    path = os.path.join(out, "big.bin")
    started = time.perf_counter()
    remaining = mib << 20
    with open(path, "wb") as f:
        while remaining:
            n = min(remaining, BLOCK)
            f.write(block[:n])
            remaining -= n
    write_s = time.perf_counter() - started
    st = os.stat(path)
    info = {"bytes": st.st_size, "allocated": st.st_blocks * 512, "ino": st.st_ino, "dev": st.st_dev,
            "write_s": write_s}
    info["ended"] = time.time()  # the last thing the script does
    with open(os.path.join(out, "written.json"), "w") as f:
        json.dump(info, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
