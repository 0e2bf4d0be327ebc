"""Run a Python module with tracemalloc on, and write the allocation sites
that grew the most since a first snapshot: a leak hunt for long runs (the
soak's ``--trace-memory``).

    python -m benchmarks.tracemem --out FILE [--settle S] [--every S] [--frames N] -- -m MODULE [ARGS...]

The first snapshot is taken ``--settle`` seconds after start (caches and
pools filled by then), then every ``--every`` seconds FILE gets a section:
the traced total and the top sites by growth since the first snapshot, each
with its last ``--frames`` frames. tracemalloc sees Python's allocations
only (not SQLite's or other C libraries' own malloc), and slows the process
down: figures from such a run are for finding leaks, not for speed.
"""

from __future__ import annotations

import argparse
import runpy
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Final

TOP: Final = 25


def watch(out: Path, settle_s: float, every_s: float) -> None:
    time.sleep(settle_s)
    first = tracemalloc.take_snapshot()
    started = time.monotonic()
    base_total = tracemalloc.get_traced_memory()[0]
    out.write_text(f"first snapshot {settle_s:.0f} s after start: {base_total / 2**20:.1f} MiB traced\n")
    while True:
        time.sleep(every_s)
        snapshot = tracemalloc.take_snapshot()
        total = tracemalloc.get_traced_memory()[0]
        # grouping walks every trace in Python, holding the GIL: the server stalls meanwhile
        growth = snapshot.compare_to(first, "traceback")
        lines = [
            "",
            f"== {time.monotonic() - started:.0f} s after the first snapshot: {total / 2**20:.1f} MiB traced"
            f" ({(total - base_total) / 2**20:+.1f} MiB); top {TOP} sites by growth",
        ]
        for stat in growth[:TOP]:
            lines.append(f"{stat.size_diff / 2**10:+10.1f} KiB {stat.count_diff:+8d} blocks")
            lines += [f"      {line}" for line in stat.traceback.format()]
        with out.open("a") as file:
            file.write("\n".join(lines) + "\n")


def main() -> None:
    argv = sys.argv[1:]
    if "--" not in argv:
        raise SystemExit("usage: python -m benchmarks.tracemem --out FILE ... -- -m MODULE [ARGS...]")
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tracemem")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--settle", type=float, default=60.0, help="seconds before the first snapshot")
    parser.add_argument("--every", type=float, default=60.0, help="seconds between reports")
    parser.add_argument("--frames", type=int, default=4, help="frames kept per allocation")
    args = parser.parse_args(argv[:split])
    target = argv[split + 1 :]
    if len(target) < 2 or target[0] != "-m":
        raise SystemExit("after --: -m MODULE [ARGS...]")
    tracemalloc.start(args.frames)
    threading.Thread(target=watch, args=(args.out, args.settle, args.every), daemon=True).start()
    sys.argv = [target[1], *target[2:]]
    runpy.run_module(target[1], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
