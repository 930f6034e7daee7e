"""Seconds from starting a command to its first output containing TEXT (default: its first output
at all), and to its exit: start-up times as a user sees them, compilation included.

    python scripts/time_to_first.py --match="iter 0: loss" -- python train.py --config configs/shakespeare_char_cpu.py
    python scripts/time_to_first.py -- python sample.py --out_dir=out-shakespeare-char-cpu --stream=True

The command's stdout is read unbuffered (PYTHONUNBUFFERED=1), so a streamed sample counts from its
first printed chunk. The README's compilation-cache figures were measured this way.
"""

import os
import subprocess
import sys
import time


def main(argv):
    match = ""
    if argv and argv[0].startswith("--match="):
        match, argv = argv[0].split("=", 1)[1], argv[1:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen, first = b"", None
    while chunk := os.read(proc.stdout.fileno(), 1 << 16):
        seen += chunk
        if first is None and (match.encode() in seen if match else seen):
            first = time.perf_counter() - t0
    rc = proc.wait()
    total = time.perf_counter() - t0
    print(f"first{' ' + repr(match) if match else ' output'}: "
          + (f"{first:.2f} s" if first is not None else "never") + f", exit: {total:.2f} s (rc {rc})")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
