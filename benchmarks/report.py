"""Benchmark report: runs every benchmark and writes benchmarks/report/.

    python -m benchmarks.report --run [--out DIR] [--only ingest,cache,...]
    python -m benchmarks.report --from DIR [--out DIR]

--run (what ``make bench`` does) runs each benchmark (ingest, cache, content,
relay) as a subprocess with --json, one after the other, passing its progress
(stderr) through with a ``[name]`` prefix, and saves its JSON result to
OUT/<name>.json. A benchmark that fails (no JSON on its last stdout line, or a
timeout) leaves OUT/<name>.failed.txt with its exit status and the tails of
its stdout and stderr; the others still run. OUT/run.json records when and on
what each ran (date, exit status, wall time, load average before and after).

--from DIR makes the plots and the summary again from the JSON files saved in
DIR, running nothing (seconds; for reviewers and tests). OUT defaults to DIR.

Either way it writes, with matplotlib (Agg, no display), PNG plots into OUT:
<name>_latency.png (latency percentiles against the benchmark's baseline) and
<name>_throughput.png (the measured figure next to its baseline and target),
and OUT/README.md, a short summary with a table per benchmark and the plots,
for reading on GitHub. Progress goes to stderr; the paths written are printed
to stdout at the end. The exit status is 1 when a benchmark failed or exited
non-zero (a failed check), 0 otherwise: a missed target is a result, not a
failure. Figures from this shared 2-core machine drift: read the ratios
against each run's baseline (GUIDE.md section 5).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, Final

from benchmarks.report_summary import write_readme
from benchmarks.servers import REPO

BENCHMARKS: Final = ("ingest", "cache", "content", "relay")
DEFAULT_OUT: Final = REPO / "benchmarks" / "report"
RUN_FILE: Final = "run.json"
#: lines of a failed benchmark's output kept in <name>.failed.txt
TAIL_LINES: Final = 80


def progress(message: str) -> None:
    print(f"report: {message}", file=sys.stderr, flush=True)


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
    }


def _stream(pipe: IO[str], name: str, tail: collections.deque[str]) -> None:
    """Passes a benchmark's stderr through, prefixed, keeping its tail."""
    for line in pipe:
        tail.append(line.rstrip("\n"))
        sys.stderr.write(f"[{name}] {line}")
        sys.stderr.flush()


def _stop(process: subprocess.Popen[str]) -> None:
    """Interrupts the benchmark and every server it started (its own session),
    so their context managers clean up; then terminates them (SIGINT is
    ignored in a background job), then kills them if they still do not end."""
    for sig, wait_s in ((signal.SIGINT, 20.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_one(name: str, out: Path, timeout_s: float) -> dict[str, Any]:
    """Runs ``python -m benchmarks.<name> --json``; saves OUT/<name>.json or
    OUT/<name>.failed.txt; returns what run.json records of it."""
    argv = [sys.executable, "-m", f"benchmarks.{name}", "--json"]
    started_at = datetime.datetime.now(datetime.UTC)
    load_before = _load_average()
    progress(f"{name}: {' '.join(['python', *argv[1:]])} (load average {load_before})")
    started = time.monotonic()
    stderr_tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    process = subprocess.Popen(
        argv,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    reader = threading.Thread(target=_stream, args=(process.stderr, name, stderr_tail), daemon=True)
    reader.start()
    timed_out = threading.Event()

    def on_timeout() -> None:
        timed_out.set()
        progress(f"{name}: no result after {timeout_s:g} s, stopping it")
        _stop(process)

    timer = threading.Timer(timeout_s, on_timeout)
    timer.start()
    try:
        stdout = process.stdout.read()
        exit_code = process.wait()
    except KeyboardInterrupt:
        _stop(process)
        raise
    finally:
        timer.cancel()
        reader.join(5)
    wall_s = round(time.monotonic() - started, 1)

    result: dict[str, Any] | None = None
    error = None
    lines = [line for line in stdout.splitlines() if line.strip()]
    if timed_out.is_set():
        error = f"timed out after {timeout_s:g} s"
    elif not lines:
        error = "printed nothing on stdout"
    else:
        try:
            decoded = json.loads(lines[-1])
        except json.JSONDecodeError as exc:
            error = f"the last stdout line is not JSON ({exc})"
        else:
            if isinstance(decoded, dict):
                result = decoded
            else:
                error = "the last stdout line is not a JSON object"

    json_path, failed_path = out / f"{name}.json", out / f"{name}.failed.txt"
    record: dict[str, Any] = {
        "command": " ".join(["python", *argv[1:]]),
        "started_at": started_at.isoformat(timespec="seconds"),
        "wall_s": wall_s,
        "exit_code": exit_code,
        "load_average_before": load_before,
        "load_average_after": _load_average(),
    }
    if result is not None:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        failed_path.unlink(missing_ok=True)
        record["result"] = json_path.name
        progress(f"{name}: exit {exit_code} after {wall_s:g} s; result in {json_path}")
    else:
        # no stale result from an earlier run next to this run's failure
        json_path.unlink(missing_ok=True)
        stdout_tail = lines[-20:]
        failed_path.write_text(
            f"python -m benchmarks.{name} --json failed: {error}\n"
            f"exit status {exit_code}, after {wall_s:g} s, started {record['started_at']}\n\n"
            f"--- last {len(stdout_tail)} stdout lines ---\n"
            + "".join(f"{line[:2000]}\n" for line in stdout_tail)
            + f"\n--- last {len(stderr_tail)} stderr lines ---\n"
            + "".join(f"{line}\n" for line in stderr_tail)
        )
        record["error"] = error
        record["failed"] = failed_path.name
        progress(f"{name}: FAILED ({error}, exit {exit_code}); see {failed_path}")
    return record


def run_all(names: list[str], out: Path, timeout_s: float) -> dict[str, Any]:
    """Runs the benchmarks; returns (and writes) OUT/run.json."""
    out.mkdir(parents=True, exist_ok=True)
    run_path = out / RUN_FILE
    previous = _read_json(run_path) if set(names) != set(BENCHMARKS) else None
    runs: dict[str, Any] = dict(previous.get("benchmarks", {})) if previous else {}
    started_at = datetime.datetime.now(datetime.UTC)
    started = time.monotonic()
    for name in names:
        runs[name] = run_one(name, out, timeout_s)
    # with --only, the earliest of this run and the earlier results kept
    earliest = min([started_at.isoformat(timespec="seconds"), *(r["started_at"] for r in runs.values())])
    meta = {
        "started_at": earliest,
        "wall_s": round(time.monotonic() - started, 1),
        "machine": machine(),
        "benchmarks": {name: runs[name] for name in BENCHMARKS if name in runs},
    }
    run_path.write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def load_results(source: Path) -> dict[str, dict[str, Any]]:
    """The saved results in ``source``, by benchmark name."""
    results = {}
    for name in BENCHMARKS:
        path = source / f"{name}.json"
        data = _read_json(path)
        if data is not None:
            results[name] = data
        elif path.exists():
            progress(f"{name}: {path} is not a JSON object; left out")
    return results


def make_report(source: Path, out: Path) -> list[Path]:
    """Plots and README.md in ``out`` from the results in ``source``; the paths written."""
    # matplotlib only here: main says it is missing before anything runs
    from benchmarks.report_plots import PLOTTERS

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if source.resolve() != out.resolve():
        # the summary links to the results: keep them next to it
        for name in (*(f"{n}.json" for n in BENCHMARKS), *(f"{n}.failed.txt" for n in BENCHMARKS), RUN_FILE):
            if (source / name).exists():
                shutil.copyfile(source / name, out / name)
                written.append(out / name)
    results = load_results(source)
    meta = _read_json(source / RUN_FILE)
    if meta is None:
        # results saved by hand: date them by their files
        stamps = [(source / f"{name}.json").stat().st_mtime for name in results]
        when = datetime.datetime.fromtimestamp(max(stamps), datetime.UTC) if stamps else None
        meta = {
            "started_at": when.isoformat(timespec="seconds") if when else None,
            "machine": None,
            "benchmarks": {},
        }
    for name in set(BENCHMARKS) - set(results):
        for stale in out.glob(f"{name}_*.png"):  # no plots of a result that is not there
            stale.unlink()
    plots: dict[str, list[Path]] = {}
    for name, result in results.items():
        plots[name] = []
        for kind, plot in PLOTTERS[name]:
            path = out / f"{name}_{kind}.png"
            try:
                plot(result, path)
            except Exception as exc:
                # a result of another shape (an older or newer benchmark): say so, carry on
                progress(f"{name}: could not plot {kind} ({type(exc).__name__}: {exc})")
                path.unlink(missing_ok=True)
                continue
            progress(f"{name}: plotted {path}")
            plots[name].append(path)
            written.append(path)
    readme = out / "README.md"
    readme.write_text(write_readme(results, meta, plots, out, BENCHMARKS))
    written.append(readme)
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report",
        description=__doc__.split("\n\n", 1)[0] if __doc__ else None,
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--run", action="store_true", help="run the benchmarks, then report (make bench)")
    what.add_argument("--from", dest="source", metavar="DIR", help="report from the JSON saved in DIR")
    parser.add_argument(
        "--out", metavar="DIR", help="where to write (default benchmarks/report; DIR with --from)"
    )
    parser.add_argument(
        "--only", metavar="NAMES", help=f"with --run: a comma-separated subset of {','.join(BENCHMARKS)}"
    )
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds a benchmark may take (default 1800)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if importlib.util.find_spec("matplotlib") is None:
        progress("matplotlib is not installed: pip install -e '.[dev]' (or pip install matplotlib)")
        return 2
    status = 0
    if args.run:
        out = Path(args.out) if args.out else DEFAULT_OUT
        names = list(BENCHMARKS)
        if args.only:
            names = [n.strip() for n in args.only.split(",") if n.strip()]
            unknown = sorted(set(names) - set(BENCHMARKS))
            if unknown:
                parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
        meta = run_all(names, out, args.timeout)
        ran = [meta["benchmarks"][name] for name in names]
        status = 1 if any(r["exit_code"] != 0 or "error" in r for r in ran) else 0
        source = out
    else:
        if args.only:
            parser.error("--only goes with --run")
        source = Path(args.source)
        if not source.is_dir():
            parser.error(f"{source} is not a directory")
        out = Path(args.out) if args.out else source
        if not any((source / f"{name}.json").exists() for name in BENCHMARKS):
            parser.error(f"no results in {source}: none of {', '.join(f'{n}.json' for n in BENCHMARKS)}")
    written = make_report(source, out)
    if args.run:
        written = [
            out / RUN_FILE,
            *(out / f"{n}.json" for n in names if (out / f"{n}.json").exists()),
            *written,
        ]
    progress(f"wrote {len(written)} files")
    for path in written:
        print(_shown(path))
    return status


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
