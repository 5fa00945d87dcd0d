"""One benchmark step: read every file of the ``--in`` folders, write ``data.txt`` into ``--out``.

The same script runs under Cairn and under the bare baseline, so both pay the same interpreter
start and the same file work; only the orchestration differs. Standard library only, no argparse,
so the step itself stays as cheap as a real "tiny" step can be.
"""

import hashlib
import os
import sys

PAYLOAD_BYTES = 4096  # a small but real file: written, then read back by the next step


def main(argv: list[str]) -> int:
    out = None
    inputs: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--out":
            out = next(args)
        elif arg == "--in":
            inputs.append(next(args))
    if out is None:
        print("usage: step.py --out DIR [--in DIR ...]", file=sys.stderr)
        return 2
    h = hashlib.blake2b(digest_size=32)
    for folder in inputs:
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), "rb") as f:
                h.update(f.read())
    digest = h.hexdigest()
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "data.txt"), "w") as f:
        f.write(digest + "\n")
        f.write((digest * (PAYLOAD_BYTES // len(digest) + 1))[:PAYLOAD_BYTES])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
