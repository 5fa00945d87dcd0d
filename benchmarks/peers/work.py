"""The one "step" every tool runs (as its own process, `python step.py ...`): read the input
folders' files, write one small file to the output folder, and note in ``ran.log`` that it ran.

    python step.py --name NAME --out DIR [--in DIR ...] [--ran FILE] [--size BYTES]

``--size`` writes a file of that many bytes instead (the 1 GB hand-off). SALT is what the
benchmark edits for "the chain after editing step 10"; changing it changes the output.
"""

import argparse
import hashlib
import os

SALT = 0

parser = argparse.ArgumentParser()
parser.add_argument("--name", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--in", dest="inputs", action="append", default=[])
parser.add_argument("--ran", default=os.environ.get("BENCH_RAN_LOG", ""))
parser.add_argument("--size", type=int, default=0)
args = parser.parse_args()
digest = hashlib.blake2b(f"{args.name}:{SALT}".encode(), digest_size=16)
for folder in args.inputs:
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        with open(path, "rb") as f:
            digest.update(f.read(1 << 16))  # a 1 GB input is only sampled: the hand-off is what is measured
os.makedirs(args.out, exist_ok=True)
if args.size:
    block = b"\0" * (1 << 20)
    with open(os.path.join(args.out, "big.bin"), "wb") as f:
        for _ in range(args.size >> 20):
            f.write(block)
else:
    with open(os.path.join(args.out, "result.txt"), "w") as f:
        f.write(digest.hexdigest() + "\n")
if args.ran:
    with open(args.ran, "a") as f:
        f.write(args.name + "\n")
