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
#: the server's counter of content answers that left after their deadline
LATE_COUNTER: Final = "sendtime_content_late_answers_total"

ABOUT: Final = {
    "ingest": (
        "Durable event intake: Segment `POST /v1/batch` bodies of 100 events, each with a fresh message"
        " id, sent by wrk on core 1 to a server on core 0, answered once the events are committed to"
        " SQLite. The baseline is the same endpoint written the plain way (FastAPI + pydantic + SQLite,"
        " WAL, synchronous FULL, one transaction per request; `benchmarks.baseline_ingest`), under the"
        " same wrk load in the same run. The gRPC StreamEvents figure is what the project's Python"
        " generator pushes through."
    ),
    "cache": (
        "The content cache's hot-path get on a hit, in ns per call (median of interleaved repeats),"
        " against the Rust store underneath (cachebox) and aiocache's SimpleMemoryCache."
    ),
    "content": (
        "Send-time content at the shape real sends have, 64 calls in flight, server on core 0 and wrk on"
        " core 1: `GET /v1/content/{user}` warm (cached), first touch (every request a user never asked"
        " before, over 100,000+ shoppers with 3-line carts, 5 views and some orders, 1,000 products,"
        " loaded through `/v1/batch`) and the whole email (`?template=abandoned_cart`), then whole emails"
        " offered at twice the rate that saturated the server (late answers and shed calls from the"
        " server's own counters). The baseline is the same endpoint written the plain way (FastAPI +"
        " aiocache + python-liquid + mjml-python, `benchmarks.baseline_content`) over the same data in the"
        " same run. Also: the same over gRPC with the project's generator, unpinned runs, the slow-upstream"
        " run (deadline 200 ms), and warm GetContent's CPU per call against a trivial gRPC echo server."
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
    return [
        (
            "events/s, HTTP /v1/batch (wrk)",
            _n(r["http_batch_events_per_s_wrk"]),
            f"plain {_n(r['baseline_batch_events_per_s'])}",
            "",
            None,
        ),
        (
            "ratio to the plain baseline",
            _n(r["http_batch_vs_baseline"], "{:.2f}", f" {TIMES}"),
            f"plain = 1 {TIMES}",
            f"≥ {t['http_batch_vs_baseline']:g} {TIMES}",
            _meets(r, "http_batch_vs_baseline"),
        ),
        (
            "batch latency p50 / p99",
            _pair_ms(r["http_p50_batch_ms"], r["http_p99_batch_ms"]),
            f"plain {_pair_ms(r['baseline_p50_batch_ms'], r['baseline_p99_batch_ms'])}",
            "",
            None,
        ),
        (
            "server CPU per event",
            _n(r.get("server_cpu_us_per_event"), "{:,.1f}", " us"),
            f"plain {_n(r.get('baseline_cpu_us_per_event'), '{:,.1f}', ' us')}",
            "",
            None,
        ),
        (
            "events/s, gRPC StreamEvents (Python generator)",
            _n(r.get("events_per_s")),
            "",
            "",
            None,
        ),
        ("ack latency p50 / p99, gRPC", _pair_ms(r.get("p50_ack_ms"), r.get("p99_ack_ms")), "", "", None),
    ]


def ingest_headline(r: Mapping[str, Any]) -> str:
    return (
        f"/v1/batch {_n(r['http_batch_events_per_s_wrk'])} events/s durable,"
        f" {r['http_batch_vs_baseline']:.2f} {TIMES} plain FastAPI + SQLite; p99 {_ms(r['http_p99_batch_ms'])}"
    )


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
    base = r.get("baseline") or {}
    vs = r.get("vs_baseline") or {}
    cpu = r.get("server_cpu_us_per_call") or {}
    overload = r.get("overload") or {}
    exposed = r.get("server_counters_exposed") or {}
    sources = r.get("slow_upstream_sources") or {}

    def call(name: str, label: str) -> list[Row]:
        return [
            (
                f"{label}, calls/s",
                _n(r[f"http_{name}_rps"]),
                f"plain {_n(base.get(f'http_{name}_rps'))} ({_n(vs.get(name), '{:.2f}', f' {TIMES}')})",
                "",
                None,
            ),
            (
                f"{label}, p50 / p99",
                _pair_ms(r[f"http_{name}_p50_ms"], r[f"http_{name}_p99_ms"]),
                f"plain {_pair_ms(base.get(f'http_{name}_p50_ms'), base.get(f'http_{name}_p99_ms'))}",
                "",
                None,
            ),
            (
                f"{label}, server CPU per call",
                _n(cpu.get(f"http_{name}"), "{:,.0f}", " us"),
                f"plain {_n(cpu.get(f'baseline_{name}'), '{:,.0f}', ' us')}",
                "",
                None,
            ),
        ]

    return [
        *call("warm", "HTTP warm"),
        *call("first_touch", "HTTP first touch"),
        *call("email", "HTTP whole email"),
        (
            "first_touch_ratio (first touch / warm)",
            _n(r["first_touch_ratio"], "{:.3f}"),
            "",
            f"≥ {t['first_touch_ratio']:g}",
            _meets(r, "first_touch_ratio"),
        ),
        (
            "email_ratio (email / first touch)",
            _n(r["email_ratio"], "{:.3f}"),
            "",
            f"≥ {t['email_ratio']:g}",
            _meets(r, "email_ratio"),
        ),
        (
            "warm_cpu_ratio (echo's CPU per call / sendtime's, gRPC)",
            _n(r["warm_cpu_ratio"], "{:.3f}"),
            f"echo {_n(cpu.get('echo'), '{:,.0f}', ' us')}",
            f"≥ {t['warm_cpu_ratio']:g}",
            _meets(r, "warm_cpu_ratio"),
        ),
        (
            "gRPC warm / first touch / email, calls/s",
            " / ".join(_n(r.get(f"grpc_{k}_rps")) for k in ("warm", "first_touch", "email")),
            "",
            "",
            None,
        ),
        (
            f"overload: emails offered at {_n(overload.get('offered_rps'))}/s: answered/s, refused (429), p99",
            f"{_n(overload.get('answered_rps'))}, {_n(overload.get('refused_429'))},"
            f" {_ms(overload.get('p99_ms'))}",
            "",
            "",
            None,
        ),
        (
            "late answers under overload (server's counter)",
            _n(r["late_answers"]) + ("" if exposed.get(LATE_COUNTER) else " (not exposed: read as 0)"),
            f"at wrk: {_n(overload.get('slower_than_deadline_at_client_pct'), '{:.2f}')}% slower than"
            f" {_n(r.get('deadline_ms'), '{:g}')} ms",
            f"{t['late_answers']:g}",
            _meets(r, "late_answers"),
        ),
        (
            "shed under overload (server's counter)",
            _n(r["shed"]),
            "",
            "",
            None,
        ),
        (
            "server exposes late / shed counters",
            " / ".join("yes" if v else "no" for v in (r.get("server_counters_exposed") or {}).values())
            or DASH,
            "",
            "",
            None,
        ),
        (
            "1 s upstream GetContent p50 / p99",
            _pair_ms(
                r.get("runs", {}).get("grpc", {}).get("slow_upstream", {}).get("p50_ms"),
                r["slow_upstream_p99_ms"],
            ),
            "",
            f"p99 < {t['slow_upstream_p99_ms']:g} ms",
            _meets(r, "slow_upstream_p99_ms"),
        ),
        (
            "deadline misses (1 s upstream run)",
            _n(r["deadline_misses"]),
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


def content_headline(r: Mapping[str, Any]) -> str:
    vs = r.get("vs_baseline") or {}
    return (
        f"first touch {_n(r['http_first_touch_rps'])}/s ({_n(vs.get('first_touch'), '{:.2f}')} {TIMES} plain),"
        f" email {_n(r['http_email_rps'])}/s ({_n(vs.get('email'), '{:.2f}')} {TIMES} plain),"
        f" warm {_n(r['http_warm_rps'])}/s; " + _late_headline(r)
    )


def _late_headline(r: Mapping[str, Any]) -> str:
    overload = r.get("overload") or {}
    if (r.get("server_counters_exposed") or {}).get(LATE_COUNTER):
        return f"{r['late_answers']} late under overload"
    slow = _n(overload.get("slower_than_deadline_at_client_pct"), "{:.1f}")
    return f"no late-answer counter; under overload {slow}% slower than {_n(r.get('deadline_ms'), '{:g}')} ms at wrk"


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
    if name in ("ingest", "content"):
        key = "sendtime_http_wrk" if name == "ingest" else "http_first_touch"
        runs = r.get("runs") or {}
        run = (runs if name == "ingest" else runs.get("wrk") or {}).get(key) or {}
        if run.get("machine_busy_pct") is not None:
            return (
                f"machine {run['machine_busy_pct']:g}% of one core (sendtime {run.get('server_cpu_pct')}%,"
                f" wrk {run.get('load_cpu_pct')}%), {key.replace('_', ' ')} run"
            )
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
