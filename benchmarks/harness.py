"""Shared bones of the benchmarks that measure a server with Debian's wrk:
which core does what, wrk runs and their parsing, CPU accounting of a server
and its worker processes, Prometheus counters, and the small helpers of a JSON
summary. Servers themselves start through benchmarks.servers (with
``cores=SERVER_CORES`` to pin them).

Why wrk: a Python load generator spends about as much CPU per call as the
server it measures (GUIDE.md section 5), so on this 2-core machine it, not
the server, sets the rate. wrk is native, and its Lua scripts give each request
its own path or body. The server runs on core 0 and wrk on core 1
(``taskset``), so a rate is the server's; the unpinned runs show both cores.

Each wrk run's script ends with the same ``done()`` (WRK_DONE below), which
prints one line, ``wrk-result {json}``: requests, duration, latency
percentiles, errors, the share of answers slower than a given deadline, and
what the script's own globals ``used`` and ``wraps`` say (how many distinct
users a pass took, and how often it ran out of them).
"""

from __future__ import annotations

import collections
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import msgspec

#: The server's core and the load generator's, when pinned.
SERVER_CORES: Final = "0"
LOAD_CORES: Final = "1"
WRK_INSTALL: Final = (
    "these benchmarks need Debian's wrk: `apt-get install wrk` (make bench installs it when run as root)"
)
_TICKS: Final = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_RESULT_MARK: Final = "wrk-result "


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def pinned(argv: Sequence[str], cores: str | None) -> list[str]:
    """``argv`` run on ``cores`` (taskset's list syntax), or as it is for None."""
    return ["taskset", "-c", cores, *argv] if cores is not None else list(argv)


def set_affinity(pid: int, cores: Iterable[int]) -> None:
    """Moves a running process, every thread of it, and its child processes
    (render workers) with their threads, to ``cores``: the same server can
    then be measured pinned and unpinned without a restart (which would empty
    its caches)."""
    wanted = set(cores)
    for process in (pid, *children(pid)):
        try:
            threads = [int(t) for t in os.listdir(f"/proc/{process}/task")]
        except OSError:
            continue
        for thread in threads:
            with suppress(OSError):  # a thread that ended meanwhile
                os.sched_setaffinity(thread, wanted)


# -- CPU accounting ---------------------------------------------------------------


def _stat_fields(pid: int) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    fields = _stat_fields(pid)
    return None if fields is None else (int(fields[11]) + int(fields[12])) / _TICKS


def machine_cpu() -> tuple[float, float] | None:
    """(busy, total) CPU ticks of the machine since boot, from /proc/stat."""
    try:
        with open("/proc/stat", "rb") as stat:
            ticks = [int(v) for v in stat.readline().split()[1:]]
    except OSError:
        return None
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return float(sum(ticks) - idle), float(sum(ticks))


def children(pid: int) -> list[int]:
    """The child processes of ``pid``, found by their parent pid in /proc."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def rss_mib(pid: int) -> float:
    """The resident memory of ``pid`` and its child processes (render
    workers), in MiB; 0 when it is gone."""
    total_kib = 0
    for each in (pid, *children(pid)):
        with suppress(OSError):
            for line in Path(f"/proc/{each}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kib += int(line.split()[1])
    return total_kib / 1024


def children_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds of each child process of ``pid`` (the server's render workers)."""
    return {child: cpu for child in children(pid) if (cpu := process_cpu_s(child)) is not None}


class ServerCpu:
    """CPU seconds a server and its child processes spent between start() and
    stop(); children that started meanwhile count from zero."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._own = 0.0
        self._children: dict[int, float] = {}
        self.own_s = 0.0
        self.children_s = 0.0
        self.wall_s = 0.0
        self._started = 0.0

    def start(self) -> None:
        self._own = process_cpu_s(self.pid) or 0.0
        self._children = children_cpu_s(self.pid)
        self._started = time.perf_counter()

    def stop(self) -> None:
        self.wall_s = time.perf_counter() - self._started
        self.own_s = (process_cpu_s(self.pid) or 0.0) - self._own
        after = children_cpu_s(self.pid)
        self.children_s = sum(cpu - self._children.get(child, 0.0) for child, cpu in after.items())

    @property
    def total_s(self) -> float:
        return self.own_s + self.children_s

    def pct(self) -> float:
        """In % of one core over the window."""
        return round(100 * self.total_s / self.wall_s, 1) if self.wall_s else 0.0

    def us_per(self, count: int) -> float | None:
        return round(self.total_s / count * 1e6, 1) if count else None


# -- wrk ----------------------------------------------------------------------------

#: The last function of every wrk script: one JSON line with what the run did.
#: ``late_pct`` is the share of answers slower than ``deadline_us`` (a global
#: the script sets; 0 for none), found by bisecting wrk's percentiles;
#: ``statuses`` counts answers by HTTP status where the script keeps a global
#: table ``statuses`` (filled by its response(), which makes wrk hand each answer to Lua).
WRK_DONE: Final = r"""
local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

local function late_share(latency, limit)
  if limit <= 0 or latency.max <= limit then return 0 end
  if latency.min > limit then return 100 end
  local lo, hi = 0, 100
  for _ = 1, 40 do
    local mid = (lo + hi) / 2
    if latency:percentile(mid) > limit then hi = mid else lo = mid end
  end
  return 100 - hi
end

function done(summary, latency, requests)
  local used, wraps, by_status = 0, 0, {}
  for _, thread in ipairs(threads) do
    used = used + (thread:get("used") or 0)
    wraps = wraps + (thread:get("wraps") or 0)
    for status, n in pairs(thread:get("statuses") or {}) do
      by_status[status] = (by_status[status] or 0) + n
    end
  end
  local counted = {}
  for status, n in pairs(by_status) do
    table.insert(counted, string.format('"%d": %d', status, n))
  end
  local e = summary.errors
  io.write(string.format(
    'wrk-result {"requests": %d, "duration_us": %d, "bytes": %d,'
    .. ' "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f,'
    .. ' "connect_errors": %d, "read_errors": %d, "write_errors": %d, "status_errors": %d,'
    .. ' "timeouts": %d, "late_pct": %.4f, "used": %d, "wraps": %d, "statuses": {%s}}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean,
    e.connect, e.read, e.write, e.status, e.timeout,
    late_share(latency, deadline_us or 0), used, wraps, table.concat(counted, ", ")))
end
"""


def wrk_answers(pace_ms: tuple[int, int] | None = None, *, back_off: bool = True) -> str:
    """Lua for a script that counts its answers by status (``statuses``, which
    WRK_DONE reports). With ``back_off``, a connection whose call was refused
    (429, or 503) waits the answer's Retry-After (1 s without one) before its
    next call, as an ESP's sender does: without it, refusals that cost the
    server little would come back at once, thousands a second. With
    ``pace_ms``, each connection also pauses a random lo..hi ms before each
    request, so many connections offer about a fixed rate (the overload runs)."""
    pacing = f"math.random({pace_ms[0]}, {pace_ms[1]})" if pace_ms is not None else "0"
    return f"""statuses = {{}}
local back_off = {"true" if back_off else "false"}
local pauses = {{}}

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if back_off and (status == 429 or status == 503) then
    local after = tonumber(headers["Retry-After"] or headers["retry-after"] or "1") or 1
    table.insert(pauses, math.floor(after * 1000))
  end
end

function delay()
  local pause = {pacing}
  if #pauses > 0 then
    pause = pause + table.remove(pauses, 1)
  end
  return pause
end
"""


def lua_string(text: str) -> str:
    """``text`` as a Lua string literal."""
    # JSON's escapes (\" \\ \n \t ...) are Lua's too; non-ASCII stays as UTF-8 bytes,
    # since LuaJIT (wrk's Lua) has no \u escapes
    return json.dumps(text, ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class WrkResult:
    label: str
    url: str
    connections: int
    duration_s: float
    #: completed requests, and those among them answered 2xx/3xx
    requests: int
    ok: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_response_bytes: float | None
    errors: dict[str, int]
    #: answers by HTTP status, where the script counted them
    statuses: dict[str, int]
    #: answers slower than the deadline the script was given (estimated from percentiles)
    late_pct: float
    #: distinct users (or bodies) the script took, and how often it ran out and began again
    used: int
    wraps: int
    #: the server's CPU (its worker processes included) over the run
    server_cpu_pct: float | None
    server_cpu_us_per_request: float | None
    #: wrk's own CPU, and the whole machine's (200 = both cores busy) over the
    #: run: what is left of the machine's use was other work on this shared machine
    load_cpu_pct: float | None
    machine_busy_pct: float | None
    load_cores: str | None
    server_cores: str | None


def require_wrk() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise SystemExit(WRK_INSTALL)
    return path


def run_wrk(
    label: str,
    url: str,
    script: str,
    *,
    work_dir: Path,
    duration_s: float,
    connections: int = 64,
    server_pid: int | None = None,
    load_cores: str | None = LOAD_CORES,
    server_cores: str | None = SERVER_CORES,
    timeout_s: float = 10.0,
) -> WrkResult:
    """Runs wrk (one thread, ``connections`` connections) with ``script`` (whose
    last part must be WRK_DONE) against ``url`` for ``duration_s``; measures the
    server's CPU meanwhile."""
    script_path = work_dir / f"{label}.lua"
    script_path.write_text(script)
    seconds = max(1, round(duration_s))
    argv = pinned(
        [
            require_wrk(),
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            f"--timeout={timeout_s:g}s",
            "-s",
            str(script_path),
            url,
        ],
        load_cores,
    )
    cpu = ServerCpu(server_pid) if server_pid else None
    if cpu:
        cpu.start()
    machine_before, wrk_before = machine_cpu(), _children_cpu_s()
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    wall = time.perf_counter() - started
    machine_after, wrk_after = machine_cpu(), _children_cpu_s()
    if cpu:
        cpu.stop()
    found = [line for line in done.stdout.splitlines() if line.startswith(_RESULT_MARK)]
    if done.returncode != 0 or not found:
        raise RuntimeError(
            f"wrk for {label} failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        )
    raw = json.loads(found[-1].removeprefix(_RESULT_MARK))
    result = parse_wrk(label, url, connections, raw, cpu)
    machine_busy = None
    if machine_before and machine_after and machine_after[1] > machine_before[1]:
        share = (machine_after[0] - machine_before[0]) / (machine_after[1] - machine_before[1])
        machine_busy = round(100 * share * (os.cpu_count() or 1), 1)
    result = _with(
        result,
        load_cores=load_cores,
        server_cores=server_cores,
        load_cpu_pct=round(100 * (wrk_after - wrk_before) / wall, 1),
        machine_busy_pct=machine_busy,
    )
    progress(
        f"{label}: {result.rps:,.0f} req/s, p50 {result.p50_ms:,.1f} ms, p99 {result.p99_ms:,.1f} ms,"
        f" {result.requests - result.ok:,} errors {result.errors or ''}, server CPU"
        f" {result.server_cpu_us_per_request} us/req ({result.server_cpu_pct}% of a core;"
        f" wrk {result.load_cpu_pct}%, machine {result.machine_busy_pct}% (100 = one core))"
    )
    return result


def parse_wrk(
    label: str, url: str, connections: int, raw: dict[str, Any], cpu: ServerCpu | None
) -> WrkResult:
    """A WrkResult from the JSON line WRK_DONE prints."""
    requests = int(raw["requests"])
    errors = {
        name: int(raw[key])
        for name, key in (
            ("connect", "connect_errors"),
            ("read", "read_errors"),
            ("write", "write_errors"),
            ("status", "status_errors"),
            ("timeout", "timeouts"),
        )
        if raw[key]
    }
    ok = max(0, requests - int(raw["status_errors"]))
    duration_s = raw["duration_us"] / 1e6
    return WrkResult(
        label=label,
        url=url,
        connections=connections,
        duration_s=round(duration_s, 3),
        requests=requests,
        ok=ok,
        rps=round(ok / duration_s, 1) if duration_s else 0.0,
        p50_ms=round(raw["p50_us"] / 1000, 2),
        p90_ms=round(raw["p90_us"] / 1000, 2),
        p99_ms=round(raw["p99_us"] / 1000, 2),
        max_ms=round(raw["max_us"] / 1000, 2),
        mean_response_bytes=round(raw["bytes"] / requests, 1) if requests else None,
        errors=errors,
        statuses={str(k): int(v) for k, v in raw.get("statuses", {}).items()},
        late_pct=round(float(raw["late_pct"]), 3),
        used=int(raw["used"]),
        wraps=int(raw["wraps"]),
        server_cpu_pct=cpu.pct() if cpu else None,
        server_cpu_us_per_request=cpu.us_per(ok) if cpu else None,
        load_cpu_pct=None,
        machine_busy_pct=None,
        load_cores=None,
        server_cores=None,
    )


def _with(result: WrkResult, **changes: Any) -> WrkResult:
    return WrkResult(**{**asdict(result), **changes})


def _children_cpu_s() -> float:
    """CPU seconds of this process's children that have been waited for (wrk)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- the server's own counters ------------------------------------------------------------


def prometheus_counters(base_url: str, names: Sequence[str]) -> dict[str, float | None]:
    """The sum over labels of each counter in ``names`` at ``base_url``/metrics,
    or None for a counter the server does not expose (or no /metrics at all)."""
    try:
        with urllib.request.urlopen(f"{base_url.rstrip('/')}/metrics", timeout=10) as response:  # noqa: S310 (loopback URL we started)
            text = response.read().decode()
    except OSError as exc:
        progress(f"could not read {base_url}/metrics: {exc}")
        return dict.fromkeys(names)
    return parse_counters(text, names)


def parse_counters(text: str, names: Sequence[str]) -> dict[str, float | None]:
    """Counters from Prometheus' text format: ``name`` or ``name{labels}``
    samples summed; a name with no sample is None."""
    sums: dict[str, float | None] = dict.fromkeys(names)
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        metric, _, rest = line.partition(" ")
        name = metric.split("{", 1)[0]
        if name in sums:
            value = float(rest.split()[0])
            sums[name] = (sums[name] or 0.0) + value
    return sums


def counter_delta(before: dict[str, float | None], after: dict[str, float | None], name: str) -> int:
    """How much a counter grew, 0 when the server does not expose it."""
    start, end = before.get(name), after.get(name)
    return 0 if end is None else round(end - (start or 0.0))


# -- the JSON summary -------------------------------------------------------------------


def report(
    result: Mapping[str, Any], summary: Callable[[Any], str], *, as_json: bool, passed: bool = True
) -> int:
    """Print a benchmark's result and give its exit status (0 when ``passed``).
    With ``as_json`` the readable summary goes to stderr and the last line of
    stdout is the result as one JSON object (what benchmarks.report reads);
    without, the summary alone, on stdout."""
    if as_json:
        print(summary(result), file=sys.stderr)
        print(msgspec.json.encode(result).decode(), flush=True)
    else:
        print(summary(result), flush=True)
    return 0 if passed else 1


def checks_line(result: Mapping[str, Any], label: str) -> str:
    """A summary's checks: 'all passed' or 'FAILED', then each check, ok or FAIL."""
    verdict = "all passed" if result["correct"] else "FAILED"
    return f"{label}: {verdict}" + "".join(
        f"\n    {'ok  ' if ok else 'FAIL'} {name}" for name, ok in result["checks"].items()
    )


def ratio(a: float | None, b: float | None) -> float:
    return round(a / b, 3) if a and b else 0.0


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f} ms"


def version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """Where a result was measured, and how busy the machine was when it began."""
    wrk = shutil.which("wrk")
    wrk_version = None
    if wrk:
        shown = subprocess.run([wrk, "--version"], capture_output=True, text=True, check=False)
        wrk_version = (shown.stdout or shown.stderr).split("Copyright")[0].strip() or None
    return {
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "wrk": wrk_version,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


@contextmanager
def work_dir(keep: str | None, prefix: str) -> Iterator[Path]:
    """A temporary folder, or ``keep`` (emptied first) to look at afterwards."""
    import tempfile

    if keep:
        path = Path(keep)
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        yield path
        progress(f"server logs and data kept in {path}")
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


# -- profiles -------------------------------------------------------------------------


@contextmanager
def py_spy(out_dir: str | None, label: str, pid: int, seconds: float) -> Iterator[None]:
    """With ``out_dir``, samples process ``pid`` with py-spy while the block
    runs (collapsed stacks in OUT_DIR/LABEL.txt) and prints where its time went."""
    if not out_dir:
        yield
        return
    spy_path = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    out = Path(out_dir) / f"{label}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [spy_path, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", "200"]
    argv += ["--format", "raw", "--threads", "--nonblocking", "--output", str(out)]
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        try:
            spy.wait(seconds + 30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()
    if out.exists():
        progress(f"py-spy samples of {label} in {out}")
        for line in summarize_stacks(out.read_text()):
            progress(f"  {line}")
    else:
        progress(f"py-spy recorded nothing for {label} (exit {spy.returncode})")


def summarize_stacks(collapsed: str, top: int = 15) -> list[str]:
    """The functions with the most samples on top of the stack (self time), and
    per thread, from py-spy's collapsed output."""
    own: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        total += int(count)
        threads[frames[0]] += int(count)
        own[frames[-1]] += int(count)
    if not total:
        return ["no samples"]
    lines = [f"{n / total:6.1%} thread {name}" for name, n in threads.most_common(5)]
    lines += [f"{n / total:6.1%} self {name}" for name, n in own.most_common(top)]
    return lines
