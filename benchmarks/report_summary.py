"""The benchmark report's README.md (benchmarks.report): a short markdown
summary of the saved results, for reading on GitHub: when and on what they
ran, a table per benchmark (figure, measured, baseline, target, met), and the
plots, linked relatively."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

Row = tuple[str, str, str, str, bool | None]

#: the multiplication sign and the en dash (escaped: ruff's RUF001 takes them for look-alikes)
TIMES: Final = "\u00d7"
DASH: Final = "\u2013"
MET: Final = "✅ met"
MISSED: Final = "❌ missed"

ABOUT: Final = {
    "ingest": (
        "Durable event intake: `sendtime serve` acks each event once it is committed to SQLite;"
        " the baseline is a trivial gRPC server with the same StreamEvents shape that acks without"
        " decoding or storing, under the same load from a generator in a process of its own."
    ),
    "cache": (
        "The content cache's hot-path get on a hit, in ns per call (median of interleaved repeats),"
        " against the Rust store underneath (cachebox) and aiocache's SimpleMemoryCache."
    ),
    "content": (
        "Send-time content at 64 calls in flight: warm GetContent (cached blocks), GetContent with an"
        " upstream block whose server sleeps 1 s (deadline 200 ms), and cold RenderEmail with the cache off;"
        " the baseline is a trivial unary gRPC server with ContentService's shape, run first and last."
    ),
    "relay": (
        "From a triggering event to the email at an SMTP server, through a zero-delay flow and sendtime's"
        " SMTP relay: a main run at 200 events/s, then rising rate steps on fresh servers until one fails"
        " (p99 over 1 s, a lost or duplicated email); the baseline is aiosmtplib sending straight to the"
        " same kind of SMTP server."
    ),
}


def _n(value: Any, fmt: str = "{:,.0f}", unit: str = "") -> str:
    if value is None:
        return DASH
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int | float):
        return fmt.format(value) + unit
    return str(value)


def _ms(value: Any) -> str:
    return _n(value, "{:,.1f}", " ms")


def _pair_ms(a: Any, b: Any) -> str:
    return f"{_n(a, '{:,.1f}')} / {_n(b, '{:,.1f}')} ms"


def _met(value: bool | None) -> str:
    if value is None:
        return ""
    return MET if value else MISSED


def _table(rows: Sequence[Row]) -> list[str]:
    lines = ["| figure | measured | baseline | target | |", "|---|---:|---:|---:|---|"]
    lines += [
        f"| {figure} | {measured} | {baseline} | {target} | {_met(met)} |"
        for figure, measured, baseline, target, met in rows
    ]
    return lines


def _checks(result: Mapping[str, Any]) -> Row | None:
    checks: Mapping[str, bool] | None = result.get("checks")
    if not checks:
        return None
    failed = [name for name, ok in checks.items() if not ok]
    text = f"all {len(checks)} passed" if not failed else "failed: " + ", ".join(f"`{n}`" for n in failed)
    return ("correctness checks", text, "", "all pass", not failed)


def _meets(result: Mapping[str, Any], key: str) -> bool | None:
    meets = result.get("meets_targets")
    if isinstance(meets, Mapping):
        value = meets.get(key)
        return bool(value) if value is not None else None
    return None


# -- per benchmark: its rows, its one-line headline, its targets met -----------


def ingest_rows(r: Mapping[str, Any]) -> list[Row]:
    t = r["targets"]
    rows: list[Row] = [
        (
            "events/s, gRPC StreamEvents",
            _n(r["events_per_s"]),
            f"echo {_n(r['echo_events_per_s'])}",
            f"≥ {_n(t['events_per_s'])}",
            _meets(r, "events_per_s"),
        ),
        ("ratio to echo", _n(r["ratio"], "{:.3f}"), "echo = 1", f"≥ {t['ratio']:g}", _meets(r, "ratio")),
        (
            "events/s, HTTP /v1/batch",
            _n(r["http_batch_events_per_s"]),
            "",
            f"≥ {_n(t['http_batch_events_per_s'])}",
            _meets(r, "http_batch_events_per_s"),
        ),
        (
            "ack latency p50 / p99, gRPC",
            _pair_ms(r["p50_ack_ms"], r["p99_ack_ms"]),
            f"echo {_pair_ms(r['echo_p50_ack_ms'], r['echo_p99_ack_ms'])}",
            "",
            None,
        ),
        (
            "batch latency p50 / p99, HTTP",
            _pair_ms(r["http_p50_batch_ms"], r["http_p99_batch_ms"]),
            "",
            "",
            None,
        ),
        (
            "server CPU, % of one core",
            _n(r.get("server_cpu_pct"), "{:g}"),
            f"echo {_n(r.get('echo_server_cpu_pct'), '{:g}')}",
            "",
            None,
        ),
    ]
    return rows


def ingest_headline(r: Mapping[str, Any]) -> str:
    return f"{_n(r['events_per_s'])} events/s durable, {r['ratio']:.2f} {TIMES} echo; p99 ack {_ms(r['p99_ack_ms'])}"


def cache_meets(r: Mapping[str, Any]) -> dict[str, bool]:
    t = r["targets"]
    return {
        "overhead_ratio": r["overhead_ratio"] <= t["overhead_ratio_max"],
        "speedup_vs_aiocache": r["speedup_vs_aiocache"] >= t["speedup_vs_aiocache_min"],
    }


def cache_rows(r: Mapping[str, Any]) -> list[Row]:
    t = r["targets"]
    meets = cache_meets(r)
    return [
        (
            "get on a hit (hot path, clock read per request)",
            _n(r["get_ns"], "{:,.1f}", " ns"),
            f"cachebox {_n(r['raw_get_ns'], '{:,.1f}', ' ns')}",
            "",
            None,
        ),
        (
            "overhead ratio (get / cachebox get)",
            _n(r["overhead_ratio"], "{:g}"),
            "cachebox = 1",
            f"≤ {t['overhead_ratio_max']:g}",
            meets["overhead_ratio"],
        ),
        (
            "speedup vs aiocache get",
            _n(r["speedup_vs_aiocache"], "{:g}", f" {TIMES}"),
            f"aiocache {_n(r['aiocache_get_ns'], '{:,.0f}', ' ns')}",
            f"≥ {t['speedup_vs_aiocache_min']:g} {TIMES}",
            meets["speedup_vs_aiocache"],
        ),
        ("get, reading the clock each call", _n(r.get("get_own_clock_ns"), "{:,.1f}", " ns"), "", "", None),
        ("RustCacheBackend.get (aiocache API)", _n(r.get("backend_get_ns"), "{:,.0f}", " ns"), "", "", None),
        ("dict.get, for scale", _n(r.get("dict_get_ns"), "{:,.1f}", " ns"), "", "", None),
    ]


def cache_headline(r: Mapping[str, Any]) -> str:
    return (
        f"get {_n(r['get_ns'], '{:,.0f}', ' ns')}: {r['overhead_ratio']:g} {TIMES} cachebox,"
        f" {r['speedup_vs_aiocache']:g} {TIMES} faster than aiocache"
    )


def content_rows(r: Mapping[str, Any]) -> list[Row]:
    t = r["targets"]
    echo = f"echo {_n(r['echo_rps'])}"
    sources = r.get("slow_upstream_sources") or {}
    return [
        ("warm GetContent, calls/s", _n(r["warm_rps"]), echo, "", None),
        (
            "warm ratio to echo",
            _n(r["warm_ratio"], "{:.3f}"),
            "echo = 1",
            f"≥ {t['warm_ratio']:g}",
            _meets(r, "warm_ratio"),
        ),
        (
            "warm p50 / p99",
            _pair_ms(r["warm_p50_ms"], r["warm_p99_ms"]),
            f"echo {_pair_ms(r['echo_p50_ms'], r['echo_p99_ms'])}",
            f"p99 ≤ {t['warm_p99_ms']:g} ms",
            _meets(r, "warm_p99_ms"),
        ),
        ("cold RenderEmail, calls/s", _n(r["cold_rps"]), echo, "", None),
        (
            "cold ratio to echo",
            _n(r["cold_ratio"], "{:.3f}"),
            "echo = 1",
            f"≥ {t['cold_ratio']:g}",
            _meets(r, "cold_ratio"),
        ),
        ("cold p50 / p99", _pair_ms(r["cold_p50_ms"], r["cold_p99_ms"]), "", "", None),
        (
            "server CPU per call, warm / cold (us)",
            _cpu_pair(r, "warm", "cold"),
            f"echo {_cpu_echo(r)}",
            "",
            None,
        ),
        (
            "CPU ratio to echo, warm / cold",
            f"{_n(r.get('warm_cpu_ratio'), '{:.3f}')} / {_n(r.get('cold_cpu_ratio'), '{:.3f}')}",
            "echo = 1",
            "",
            None,
        ),
        ("1 s upstream GetContent, calls/s", _n(r["slow_upstream_rps"]), echo, "", None),
        (
            "1 s upstream p50 / p99",
            _pair_ms(r["slow_upstream_p50_ms"], r["slow_upstream_p99_ms"]),
            "",
            f"p99 < {t['slow_upstream_p99_ms']:g} ms",
            _meets(r, "slow_upstream_p99_ms"),
        ),
        (
            "deadline misses (whole 1 s upstream run)",
            f"{_n(r['deadline_misses'])} of {_n(r.get('slow_upstream_calls'))}",
            "",
            f"{t['deadline_misses']:g}",
            _meets(r, "deadline_misses"),
        ),
        (
            "upstream block sources",
            ", ".join(f"{k.split(': ', 1)[-1]} {n:,}" for k, n in sources.items()) or DASH,
            "",
            "",
            None,
        ),
    ]


def _cpu_pair(r: Mapping[str, Any], *runs: str) -> str:
    per_call = r.get("server_cpu_us_per_call") or {}
    return " / ".join(_n(per_call.get(run), "{:,.0f}") for run in runs)


def _cpu_echo(r: Mapping[str, Any]) -> str:
    echo = [v for v in (r.get("server_cpu_us_per_call") or {}).get("echo", []) if v is not None]
    return _n(sum(echo) / len(echo), "{:,.0f}") if echo else DASH


def content_headline(r: Mapping[str, Any]) -> str:
    return (
        f"warm {_n(r['warm_rps'])} calls/s ({r['warm_ratio']:.2f} {TIMES} echo), p99 {_ms(r['warm_p99_ms'])};"
        f" cold {r['cold_ratio']:.2f} {TIMES} echo; {r['deadline_misses']} deadline misses"
    )


def relay_rows(r: Mapping[str, Any]) -> list[Row]:
    t = r.get("targets") or {
        "p99_event_to_smtp_ms": 100.0,
        "lost": 0,
        "duplicates": 0,
        "max_emails_per_s": 500.0,
    }
    baselines = [b for b in r.get("smtp_baselines") or [] if b]
    baseline_p = (
        f"SMTP alone {_pair_ms(baselines[0].get('p50_ms'), baselines[0].get('p99_ms'))} per email"
        if baselines
        else ""
    )
    main = r.get("main") or {}
    return [
        (
            f"main run: {r['rate_per_s']:g} events/s for {r['duration_s']:g} s",
            f"{_n(r['sent'])} sent, {_n(main.get('received'))} received",
            "",
            "",
            None,
        ),
        (
            "event → SMTP p50 / p99",
            _pair_ms(r["p50_event_to_smtp_ms"], r["p99_event_to_smtp_ms"]),
            baseline_p,
            f"p99 ≤ {t['p99_event_to_smtp_ms']:g} ms",
            _meets(r, "p99_event_to_smtp_ms"),
        ),
        ("lost (late)", f"{_n(r['lost'])} ({_n(r.get('late'))})", "", f"{t['lost']:g}", _meets(r, "lost")),
        ("duplicates, every run", _n(r["duplicates"]), "", f"{t['duplicates']:g}", _meets(r, "duplicates")),
        (
            "max emails/s sustained (rate steps)",
            _n(r.get("max_emails_per_s"), "{:,.0f}", "/s"),
            f"SMTP alone {_n(r.get('smtp_baseline_emails_per_s'), '{:,.0f}', '/s')}",
            f"≥ {t['max_emails_per_s']:g}/s",
            _meets(r, "max_emails_per_s"),
        ),
        ("step search stopped by", _n(r.get("max_emails_per_s_stopped_by")), "", "", None),
    ]


def relay_headline(r: Mapping[str, Any]) -> str:
    return (
        f"p99 event → SMTP {_ms(r['p99_event_to_smtp_ms'])} at {r['rate_per_s']:g}/s,"
        f" {r['lost']} lost, {r['duplicates']} duplicates; max {_n(r.get('max_emails_per_s'))} emails/s"
    )


def _targets_met(name: str, r: Mapping[str, Any]) -> tuple[int, int]:
    meets = cache_meets(r) if name == "cache" else r.get("meets_targets")
    if not isinstance(meets, Mapping):
        return (0, 0)
    return sum(1 for ok in meets.values() if ok), len(meets)


ROWS: Final[dict[str, Callable[[Mapping[str, Any]], list[Row]]]] = {
    "ingest": ingest_rows,
    "cache": cache_rows,
    "content": content_rows,
    "relay": relay_rows,
}
HEADLINES: Final[dict[str, Callable[[Mapping[str, Any]], str]]] = {
    "ingest": ingest_headline,
    "cache": cache_headline,
    "content": content_headline,
    "relay": relay_headline,
}


# -- the machine and the load on it ---------------------------------------------


def _machine_line(results: Mapping[str, Mapping[str, Any]], meta: Mapping[str, Any]) -> str:
    machine = meta.get("machine") or {}
    cpus = machine.get("cpu_count")
    python = machine.get("python")
    where = machine.get("platform")
    for r in results.values():  # results saved without run.json still name their machine
        cpus = cpus or r.get("cpu_count") or (r.get("machine") or {}).get("cpus")
        python = python or r.get("python") or (r.get("machine") or {}).get("python")
        where = where or r.get("platform")
    parts = [f"{cpus} CPUs" if cpus else None, f"Python {python}" if python else None, where]
    return ", ".join(p for p in parts if p) or "not recorded"


def _other_work(name: str, r: Mapping[str, Any]) -> str:
    """What the benchmark itself saw of the machine's load, where it records it."""
    if name == "ingest" and r.get("machine_busy_pct") is not None:
        server, generator = r.get("server_cpu_pct") or 0.0, r.get("generator_cpu_pct") or 0.0
        return (
            f"machine busy {r['machine_busy_pct']:g}% of one core (sendtime {server:g}%,"
            f" generator {generator:g}%), gRPC run"
        )
    if name == "content":
        warm = (r.get("runs") or {}).get("warm") or [{}]
        busy = warm[0].get("machine_busy_pct")
        if busy is not None:
            return f"machine busy {busy:g}% of one core, warm run"
    if name == "relay":
        cpu = (r.get("main") or {}).get("cpu_pct_of_one_core") or {}
        if cpu.get("others") is not None:
            return f"others {cpu['others']:g}% of one core (machine busy {cpu.get('machine')}%), main run"
    return ""


def _load(run: Mapping[str, Any]) -> str:
    before, after = run.get("load_average_before"), run.get("load_average_after")
    if not before or not after:
        return DASH
    return f"{before[0]:.1f} → {after[0]:.1f}"


def _when(iso: str | None) -> str:
    return iso.replace("T", " ").replace("+00:00", " UTC") if iso else "at an unknown time"


def _why(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


def _no_result(name: str, run: Mapping[str, Any], out: Path) -> str:
    failed = run.get("failed") or f"{name}.failed.txt"
    if not run.get("error") and not (out / failed).exists():
        return "no result: not run"
    text = f"❌ failed: {run.get('error') or 'no result'}"
    if (out / failed).exists():
        text += f", its output is in [{failed}]({failed})"
    return text


# -- the page ---------------------------------------------------------------------


def write_readme(
    results: Mapping[str, Mapping[str, Any]],
    meta: Mapping[str, Any],
    plots: Mapping[str, Sequence[Path]],
    out: Path,
    names: Sequence[str],
) -> str:
    runs: Mapping[str, Mapping[str, Any]] = meta.get("benchmarks") or {}
    when = _when(meta.get("started_at"))
    lines = [
        "# sendtime benchmark report",
        "",
        (
            f"Run {when} by `make bench` (`python -m benchmarks.report --run`);"
            if runs
            else f"Results saved {when} (their files' time);"
        )
        + " plots and this page are made again from the JSON results, running nothing, with"
        " `python -m benchmarks.report --from benchmarks/report`.",
        "",
        f"**Machine:** {_machine_line(results, meta)}."
        " It is small and shared with other work: absolute rates and latencies drift from run to run,"
        " so each benchmark measures its baseline in the same run, and the ratios to it are the figures"
        " to compare (GUIDE.md section 5). How busy the machine was: the 1-minute load average before and"
        " after each benchmark (its own processes included) and, where a benchmark records it, the CPU it"
        " saw in use (100% = one core of the machine's).",
        "",
        "| benchmark | result | targets met | checks | wall time | load average | CPU in use |",
        "|---|---|---|---|---:|---|---|",
    ]
    for name in names:
        run = runs.get(name) or {}
        r = results.get(name)
        if r is None:
            lines.append(f"| [{name}](#{name}) | {_no_result(name, run, out)} | | | | {_load(run)} | |")
            continue
        try:
            met, total = _targets_met(name, r)
            checks = _checks(r)
            check_text = DASH if checks is None else ("✅ passed" if checks[4] else "❌ failed")
            headline, targets, busy = (
                HEADLINES[name](r),
                f"{'✅' if met == total else '❌'} {met} of {total}",
                _other_work(name, r),
            )
        except Exception as exc:  # a result of another shape: say so, carry on
            headline, targets, check_text, busy = f"cannot summarise: {_why(exc)}", "", "", ""
        wall = run.get("wall_s")
        lines.append(
            f"| [{name}](#{name}) | {headline} | {targets} | {check_text} | {_n(wall, '{:,.0f}', ' s')}"
            f" | {_load(run)} | {busy} |"
        )
    for name in names:
        lines += ["", f"## {name}", "", ABOUT[name], ""]
        r = results.get(name)
        run = runs.get(name) or {}
        if r is None:
            text = _no_result(name, run, out)
            lines.append(f"{text[:1].upper()}{text[1:]}.")
            continue
        try:
            rows = ROWS[name](r)
            checks = _checks(r)
        except Exception as exc:  # a result of another shape: say so, carry on
            lines += [f"Cannot summarise this result ({_why(exc)}): see the JSON.", ""]
        else:
            if checks is not None:
                rows.append(checks)
            lines += _table(rows)
            lines.append("")
        if run.get("exit_code") not in (None, 0):
            lines += [f"The benchmark exited with status {run['exit_code']} (a failed check).", ""]
        for path in plots.get(name, []):
            kind = path.stem.removeprefix(f"{name}_")
            lines += [f"![{name} {kind}]({path.name})", ""]
        started = f", started {_when(run['started_at'])}" if run.get("started_at") else ""
        lines.append(f"Full result: [{name}.json]({name}.json){started}.")
    return "\n".join(lines) + "\n"
