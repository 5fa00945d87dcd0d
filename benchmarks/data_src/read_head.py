"""Step B of the hand-off benchmark: look at step A's file without reading it through.

Writes ``seen.json`` into ``--out``: the input file's path, size, inode, link count and first
16 bytes, so that the benchmark can check that B was given A's committed file itself (no copy).
"""

import json
import os
import sys


def main(argv: list[str]) -> int:
    folder, out = argv[argv.index("--in") + 1], argv[argv.index("--out") + 1]
    path = os.path.join(folder, "big.bin")
    st = os.stat(path)
    with open(path, "rb") as f:
        head = f.read(16)
    seen = {"path": path, "size": st.st_size, "ino": st.st_ino, "dev": st.st_dev, "nlink": st.st_nlink,
            "head": head.hex(), "mode": oct(st.st_mode & 0o777)}
    with open(os.path.join(out, "seen.json"), "w") as f:
        json.dump(seen, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
