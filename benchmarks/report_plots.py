"""The benchmark report's plots (benchmarks.report): PNG files made with
matplotlib's Agg canvas, no display and no pyplot state.

Per benchmark, from its saved JSON result:

- <name>_latency.png: latency percentiles against the benchmark's baseline
  (the benchmarks keep p50/p90/p99/max per run, not whole histograms, so each
  curve is a step through those points: up to a percentile, latency is at most
  its value);
- <name>_throughput.png: the measured figure next to its baseline and target.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, NullFormatter, NullLocator

DPI: Final = 100
#: the multiplication sign (escaped: ruff's RUF001 takes it for a look-alike of x)
TIMES: Final = "\u00d7"
BASELINE: Final = "#8c8c8c"
BASELINE_2: Final = "#b5b5b5"
SENDTIME: Final = "#1f77b4"
COLORS: Final = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#d62728")
TARGET: Final = "#d62728"
LIMIT: Final = "#444444"
#: where a percentile sits on the x axis: 1 / (1 - q), log scale; max past p99.9
PERCENTILE_X: Final = {"p50": 2.0, "p90": 10.0, "p99": 100.0, "max": 1000.0}

LineStyle = Literal["-", "--", ":", "-."]
Loc = Literal["upper right", "upper left", "lower right", "center left"]
Plotter = Callable[[Mapping[str, Any], Path], None]


def _figure(width: float = 7.5, height: float = 4.4, ncols: int = 1) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _save(fig: Figure, path: Path) -> None:
    # no Software/date metadata: the same figures make the same file
    fig.savefig(path, dpi=DPI, metadata={"Software": None})


def _n(value: float | None) -> str:
    return "no figure" if value is None else f"{value:,.0f}"


def _thousands(value: float, _pos: int | None = None) -> str:
    if value >= 1:
        return f"{value:,.0f}"
    return f"{value:g}"


def _log_y(ax: Axes, values: Sequence[float]) -> None:
    """A log y axis (latencies span decades) with plain numbers for ticks."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(_thousands))
    low, high = min(values), max(values)
    if high / low < 30:
        # under about 1.5 decades the major ticks alone are too few
        ax.yaxis.set_minor_formatter(FuncFormatter(_thousands))
    else:
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(low / 1.6, high * 1.8)


def _percentile_axis(ax: Axes) -> None:
    ax.set_xscale("log")
    ax.set_xticks(list(PERCENTILE_X.values()), list(PERCENTILE_X))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(1.5, 1400)
    ax.set_xlabel("percentile of calls (step: up to a percentile, latency is at most its value)")
    ax.grid(True, which="major", alpha=0.3)
    ax.grid(True, which="minor", axis="y", alpha=0.12)


def _percentile_curve(
    ax: Axes,
    label: str,
    points: Mapping[str, float | None],
    *,
    color: str,
    linestyle: str = "-",
    marker: str = "o",
    linewidth: float = 2.0,
) -> list[float]:
    """One step curve through p50/p90/p99/max; the values it drew."""
    xs = [PERCENTILE_X[k] for k, v in points.items() if v is not None]
    ys = [float(v) for v in points.values() if v is not None]
    if not ys:
        return []
    ax.plot(
        xs,
        ys,
        drawstyle="steps-pre",
        color=color,
        linestyle=linestyle,
        linewidth=linewidth,
        label=label,
    )
    ax.plot(xs, ys, linestyle="none", marker=marker, color=color, markersize=5)
    return ys


def _hline(ax: Axes, y: float, label: str, *, color: str = TARGET, linestyle: str = "--") -> None:
    ax.axhline(y, color=color, linestyle=linestyle, linewidth=1.2, label=label)


def _points(run: Mapping[str, Any], suffix: str) -> dict[str, float | None]:
    return {k: run.get(f"{k}{suffix}") for k in PERCENTILE_X}


def _target_mark(ax: Axes, x: float, y: float, *, width: float = 0.8, style: LineStyle = "--") -> None:
    """A target level drawn across one bar, its value at its right end."""
    right = x + width / 2 + 0.04
    ax.plot([x - width / 2 - 0.04, right], [y, y], color=TARGET, linestyle=style, linewidth=2)
    ax.annotate(
        f"{y:,.0f}",
        (right, y),
        xytext=(2, 0),
        textcoords="offset points",
        va="center",
        fontsize=8,
        color=TARGET,
    )


def _target_legend(
    ax: Axes, labels: Sequence[tuple[LineStyle, str]], loc: Loc = "upper right", *, dots: str | None = None
) -> None:
    """The legend of the target marks (and of the dots of single runs)."""
    handles = [Line2D([], [], color=TARGET, linestyle=style, linewidth=2) for style, _ in labels]
    texts = [label for _, label in labels]
    if dots:
        handles.append(Line2D([], [], linestyle="none", marker="o", color="black", markersize=4))
        texts.append(dots)
    ax.legend(handles, texts, loc=loc, fontsize=9, framealpha=0.9)


def _bars(
    ax: Axes,
    labels: Sequence[str],
    values: Sequence[float | None],
    colors: Sequence[str],
    unit: str = "/s",
) -> list[float]:
    """Vertical bars, each value under its label (where no target line can
    cover it); a missing figure is an empty slot marked "no figure"."""
    xs = [float(i) for i in range(len(labels))]
    shown = [(x, v, c) for x, v, c in zip(xs, values, colors, strict=True) if v is not None]
    ax.bar([x for x, _, _ in shown], [v for _, v, _ in shown], color=[c for _, _, c in shown], width=0.62)
    ax.set_xticks(
        xs,
        [
            f"{label}\n{value:,.0f}{unit}" if value is not None else f"{label}\nno figure"
            for label, value in zip(labels, values, strict=True)
        ],
    )
    ax.set_xlim(-0.6, len(labels) - 0.25)  # room right of the last bar for a target's value
    ax.yaxis.set_major_formatter(FuncFormatter(_thousands))
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    return xs


def _top(ax: Axes, values: Sequence[float | None]) -> None:
    """Room above the tallest bar or target for labels and a legend."""
    ax.set_ylim(0, max((v for v in values if v is not None), default=1.0) * 1.3)


# -- ingest --------------------------------------------------------------------


def ingest_latency(result: Mapping[str, Any], path: Path) -> None:
    runs = result["runs"]
    fig, (ax,) = _figure(7.5, 5.2)
    drawn = _percentile_curve(
        ax,
        "plain FastAPI + pydantic + SQLite (baseline)",
        _points(runs["baseline_http_wrk"], "_ms"),
        color=BASELINE,
    )
    drawn += _percentile_curve(
        ax, "sendtime HTTP /v1/batch", _points(runs["sendtime_http_wrk"], "_ms"), color=SENDTIME
    )
    if runs.get("sendtime_grpc"):
        drawn += _percentile_curve(
            ax,
            "sendtime gRPC StreamEvents (per event, Python generator)",
            _points(runs["sendtime_grpc"], "_ack_ms"),
            color=COLORS[1],
            linestyle="--",
            marker="s",
        )
    _percentile_axis(ax)
    _log_y(ax, drawn)
    ax.set_ylabel("latency (ms, log scale)")
    fig.suptitle(
        f"Ingest: /v1/batch latency, {result['events_per_batch']} events a request,"
        f" wrk {result['connections']} connections\nsendtime vs a plain FastAPI + pydantic + SQLite intake,"
        " server on core 0, wrk on core 1",
        fontsize=11,
    )
    # below the axes: no curve runs under it, whatever the figures
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=1, fontsize=9)
    _save(fig, path)


def ingest_throughput(result: Mapping[str, Any], path: Path) -> None:
    targets = result["targets"]
    base = result["baseline_batch_events_per_s"]
    fig, (ax,) = _figure(6.5, 4.4)
    values = [base, result["http_batch_events_per_s_wrk"], result.get("events_per_s")]
    xs = _bars(
        ax,
        [
            "plain FastAPI\n+ SQLite (baseline)",
            "sendtime HTTP\n/v1/batch",
            "sendtime gRPC\n(Python generator)",
        ],
        values,
        [BASELINE, SENDTIME, COLORS[1]],
    )
    _target_mark(ax, xs[1], targets["http_batch_vs_baseline"] * base)
    _top(ax, [*values, targets["http_batch_vs_baseline"] * base])
    _target_legend(
        ax, [("--", f"target: {targets['http_batch_vs_baseline']:g} {TIMES} the baseline")], "upper left"
    )
    ax.set_ylabel("events committed and acknowledged per second")
    fig.suptitle(
        f"Ingest: durable events/s over {result['duration_s']:g} s"
        f" ({result['http_batch_vs_baseline']:.2f} {TIMES} the plain baseline)",
        fontsize=11,
    )
    _save(fig, path)


# -- cache ---------------------------------------------------------------------

CACHE_VARIANTS: Final = (
    ("dict_get_ns", "dict.get (floor)", BASELINE_2, ":"),
    ("raw_get_ns", "cachebox get (baseline)", BASELINE, "-"),
    ("get_ns", "sendtime lookup (hot path)", SENDTIME, "-"),
    ("get_own_clock_ns", "sendtime lookup, own clock read", COLORS[2], "--"),
    ("backend_get_ns", "RustCacheBackend.get (aiocache API)", COLORS[3], "--"),
    ("aiocache_get_ns", "aiocache SimpleMemoryCache.get (baseline)", COLORS[1], "-"),
)


def cache_latency(result: Mapping[str, Any], path: Path) -> None:
    samples: Mapping[str, Sequence[float]] = result["samples"]
    fig, (ax,) = _figure(9.0, 4.4)
    drawn: list[float] = []
    repeats = 0
    for key, label, color, style in CACHE_VARIANTS:
        values = sorted(samples.get(key, []))
        if not values:
            continue
        repeats = max(repeats, len(values))
        ranks = [100.0 * (i + 1) / len(values) for i in range(len(values))]
        ax.plot(ranks, values, drawstyle="steps-pre", color=color, linestyle=style, linewidth=2, label=label)
        ax.plot(ranks, values, linestyle="none", marker="o", markersize=4, color=color)
        drawn += values
    _log_y(ax, drawn)
    ax.set_xlim(0, 103)
    ax.set_xlabel(f"percentile of the {repeats} repeats (each a mean over many calls)")
    ax.set_ylabel("ns per get (log scale)")
    ax.grid(True, alpha=0.3)
    fig.suptitle(
        "Cache: time per get on a hit, in each repeat, vs cachebox and aiocache\n"
        f"{result['calls_per_sample']:,} calls per sample; the report's figure is the median",
        fontsize=11,
    )
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9)
    _save(fig, path)


def cache_throughput(result: Mapping[str, Any], path: Path) -> None:
    targets = result["targets"]
    fig, (ax,) = _figure(8.5, 4.0)
    shown = [(key, label, color) for key, label, color, _ in CACHE_VARIANTS if result.get(key) is not None]
    ys = list(range(len(shown)))
    values = [float(result[key]) for key, _, _ in shown]
    ax.barh(ys, values, color=[c for _, _, c in shown], height=0.62)
    for y, value in zip(ys, values, strict=True):
        ax.annotate(
            f"{value:,.0f} ns",
            (value, y),
            xytext=(4, 0),
            textcoords="offset points",
            va="center",
            fontsize=9,
        )
    ax.set_yticks(ys, [label for _, label, _ in shown])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(_thousands))
    ax.set_xlim(min(values) / 2, max(values) * 4)
    get_row = next(i for i, (key, _, _) in enumerate(shown) if key == "get_ns")
    over = targets["overhead_ratio_max"] * result["raw_get_ns"]
    speed = result["aiocache_get_ns"] / targets["speedup_vs_aiocache_min"]
    for x, style in ((over, "--"), (speed, ":")):
        ax.plot([x, x], [get_row - 0.45, get_row + 0.45], color=TARGET, linestyle=style, linewidth=2.5)
    handles = [Line2D([], [], color=TARGET, linestyle=s, linewidth=2) for s in ("--", ":")]
    ax.legend(
        handles,
        [
            f"target: ≤ {targets['overhead_ratio_max']:g} {TIMES} cachebox get",
            f"target: ≤ aiocache get / {targets['speedup_vs_aiocache_min']:g}",
        ],
        loc="upper right",
        fontsize=9,
    )
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_xlabel("ns per get, median of repeats (log scale; lower is better)")
    fig.suptitle(
        f"Cache: get on a hit, {result['overhead_ratio']:g} {TIMES} cachebox,"
        f" {result['speedup_vs_aiocache']:g} {TIMES} faster than aiocache",
        fontsize=11,
    )
    _save(fig, path)


# -- content -------------------------------------------------------------------


CONTENT_CALLS: Final = (
    ("warm", "warm", "o"),
    ("first_touch", "first touch", "s"),
    ("email", "whole email", "^"),
)


def content_latency(result: Mapping[str, Any], path: Path) -> None:
    wrk = result["runs"]["wrk"]
    fig, (ax,) = _figure(8.5, 4.8)
    drawn: list[float] = []
    for i, (key, label, marker) in enumerate(CONTENT_CALLS):
        drawn += _percentile_curve(
            ax,
            f"plain: {label}",
            _points(wrk[f"baseline_{key}"], "_ms"),
            color=COLORS[i],
            linestyle=":",
            marker=marker,
            linewidth=1.5,
        )
        drawn += _percentile_curve(
            ax, f"sendtime: {label}", _points(wrk[f"http_{key}"], "_ms"), color=COLORS[i], marker=marker
        )
    drawn += _percentile_curve(
        ax,
        f"sendtime: emails at {result['overload']['offered_rps']:,.0f}/s offered (overload)",
        _points(wrk["overload"], "_ms"),
        color=COLORS[4],
        linestyle="--",
        marker="x",
    )
    _hline(ax, result["deadline_ms"], f"default deadline {result['deadline_ms']:g} ms")
    _percentile_axis(ax)
    _log_y(ax, [*drawn, result["deadline_ms"]])
    ax.set_ylabel("latency at wrk (ms, log scale)")
    fig.suptitle(
        "Content over HTTP: sendtime vs a plain FastAPI + aiocache + python-liquid + mjml-python service\n"
        f"{result['concurrency']} in flight, {result['duration_s']:g} s each, server on core 0, wrk on core 1;"
        + (
            f" late answers under overload: {result['late_answers']}"
            if (result.get("server_counters_exposed") or {}).get("sendtime_content_late_answers_total")
            else " the server counts no late answers"
        ),
        fontsize=11,
    )
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9)
    _save(fig, path)


def content_throughput(result: Mapping[str, Any], path: Path) -> None:
    targets = result["targets"]
    base = result["baseline"]
    fig, (ax,) = _figure(8.0, 4.6)
    labels: list[str] = []
    values: list[float | None] = []
    colors: list[str] = []
    for key, label, _ in CONTENT_CALLS:
        labels += [f"plain\n{label}", f"sendtime\n{label}"]
        values += [base.get(f"http_{key}_rps"), result[f"http_{key}_rps"]]
        colors += [BASELINE, SENDTIME]
    xs = _bars(ax, labels, values, colors)
    _target_mark(ax, xs[3], targets["first_touch_ratio"] * result["http_warm_rps"])
    _target_mark(ax, xs[5], targets["email_ratio"] * result["http_first_touch_rps"], style=":")
    _top(ax, values)
    _target_legend(
        ax,
        [
            ("--", f"target: first touch {targets['first_touch_ratio']:g} {TIMES} warm"),
            (":", f"target: email {targets['email_ratio']:g} {TIMES} first touch"),
        ],
    )
    ax.set_ylabel("answers per second")
    fig.suptitle(
        f"Content over HTTP: calls/s at {result['concurrency']} in flight (first touch"
        f" {result['first_touch_ratio']:.2f} of warm, email {result['email_ratio']:.2f} of first touch)",
        fontsize=11,
    )
    _save(fig, path)


# -- relay ---------------------------------------------------------------------


def relay_latency(result: Mapping[str, Any], path: Path) -> None:
    steps: Sequence[Mapping[str, Any]] = result.get("steps") or []
    targets = result.get("targets", {"p99_event_to_smtp_ms": 100.0})
    limit = (result.get("settings") or {}).get("max_p99_ms", 1000.0)
    fig, (ax,) = _figure(8.0, 6.0)
    drawn: list[float] = []
    # the deciding attempt at each rate (a retried step's last run) makes the line
    deciding: dict[float, Mapping[str, Any]] = {}
    for step in steps:
        deciding[float(step["rate_per_s"])] = step
    for key, label, color, marker in (
        ("p50_event_to_smtp_ms", "p50", COLORS[0], "o"),
        ("p99_event_to_smtp_ms", "p99", COLORS[1], "s"),
    ):
        line = [(rate, s[key]) for rate, s in sorted(deciding.items()) if s[key] is not None]
        if line:
            ax.plot(
                [r for r, _ in line],
                [v for _, v in line],
                color=color,
                linewidth=2,
                marker=marker,
                markersize=5,
                label=f"{label} per rate step ({result['settings']['step_duration_s']:g} s each)",
            )
            drawn += [v for _, v in line]
        failed = [
            (float(s["rate_per_s"]), s[key]) for s in steps if not s["sustained"] and s[key] is not None
        ]
        if failed:
            ax.plot(
                [r for r, _ in failed],
                [v for _, v in failed],
                linestyle="none",
                marker="X",
                markersize=9,
                color=color,
                markeredgecolor="black",
            )
            drawn += [v for _, v in failed]
    main_rate = float(result["rate_per_s"])
    for key, color, label in (
        ("p50_event_to_smtp_ms", COLORS[0], "p50"),
        ("p99_event_to_smtp_ms", COLORS[1], "p99"),
    ):
        if result.get(key) is not None:
            # hollow: a step's marker at the same rate shows through
            ax.plot(
                [main_rate],
                [result[key]],
                linestyle="none",
                marker="*",
                markersize=18,
                markerfacecolor="none",
                markeredgewidth=1.8,
                color=color,
                label=f"main run {label} ({main_rate:g}/s, {result['duration_s']:g} s)",
            )
            drawn.append(result[key])
    _hline(ax, limit, f"{limit / 1000:g} s: a step's p99 limit", color=LIMIT, linestyle="-")
    _hline(
        ax,
        targets["p99_event_to_smtp_ms"],
        f"p99 target at {main_rate:g}/s: {targets['p99_event_to_smtp_ms']:g} ms",
        linestyle=":",
    )
    baseline_p99 = [b["p99_ms"] for b in result.get("smtp_baselines") or [] if b and b.get("p99_ms")]
    if baseline_p99:
        value = max(baseline_p99)
        _hline(ax, value, "SMTP alone (aiosmtplib): p99 per email (baseline)", color=BASELINE)
        drawn.append(value)
    if any(not s["sustained"] for s in steps):
        ax.plot(
            [],
            [],
            linestyle="none",
            marker="X",
            markersize=9,
            color=BASELINE_2,
            markeredgecolor="black",
            label="step not held",
        )
    rates = sorted({float(s["rate_per_s"]) for s in steps} | {main_rate})
    ax.set_xscale("log")
    ax.set_xticks(rates, [f"{r:g}" for r in rates], fontsize=8)
    ax.xaxis.set_minor_locator(NullLocator())
    _log_y(ax, [*drawn, limit, targets["p99_event_to_smtp_ms"]])
    ax.grid(True, alpha=0.3)
    ax.set_xlabel("offered rate (events/s, each firing one email; log scale)")
    ax.set_ylabel("event → SMTP arrival (ms, log scale)")
    fig.suptitle(
        "Relay: triggering event to email at the SMTP server\n"
        f"max sustained {_n(result['max_emails_per_s'])}/s; stopped by {result['max_emails_per_s_stopped_by']}",
        fontsize=11,
    )
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncols=2, fontsize=9)
    _save(fig, path)


def relay_throughput(result: Mapping[str, Any], path: Path) -> None:
    targets = result.get("targets", {"max_emails_per_s": 500.0})
    steps: Sequence[Mapping[str, Any]] = result.get("steps") or []
    fig, (ax, ax2) = _figure(10.0, 4.4, ncols=2)
    baselines = [b["emails_per_s"] for b in result.get("smtp_baselines") or [] if b]
    values = [result.get("smtp_baseline_emails_per_s"), result.get("max_emails_per_s")]
    xs = _bars(
        ax,
        ["SMTP alone\n(aiosmtplib, baseline)", "sendtime relay\nmax sustained"],
        values,
        [BASELINE, SENDTIME],
    )
    if len(baselines) > 1:
        ax.plot(
            [xs[0]] * len(baselines), baselines, linestyle="none", marker="o", color="black", markersize=4
        )
    _target_mark(ax, xs[1], targets["max_emails_per_s"])
    _top(ax, [*values, *baselines, targets["max_emails_per_s"]])
    _target_legend(
        ax,
        [("--", f"target ≥ {targets['max_emails_per_s']:g} emails/s")],
        dots="each baseline run (bar: their mean)" if len(baselines) > 1 else None,
    )
    ax.set_ylabel("emails per second")
    ax.set_title("Relay: emails/s, sendtime vs SMTP path alone", fontsize=11)

    offered = [float(s["rate_per_s"]) for s in steps if s.get("smtp_emails_per_s") is not None]
    measured = [float(s["smtp_emails_per_s"]) for s in steps if s.get("smtp_emails_per_s") is not None]
    held = [bool(s["sustained"]) for s in steps if s.get("smtp_emails_per_s") is not None]
    if offered:
        top = max(*offered, *measured) * 1.1
        ax2.plot([0, top], [0, top], color=BASELINE_2, linestyle=":", label="delivered = offered")
        ax2.plot(
            [o for o, h in zip(offered, held, strict=True) if h],
            [m for m, h in zip(measured, held, strict=True) if h],
            linestyle="none",
            marker="o",
            color=SENDTIME,
            label="step held",
        )
        if not all(held):
            ax2.plot(
                [o for o, h in zip(offered, held, strict=True) if not h],
                [m for m, h in zip(measured, held, strict=True) if not h],
                linestyle="none",
                marker="X",
                markersize=9,
                color=TARGET,
                label="step not held",
            )
        ax2.set_xlim(0, top)
        ax2.set_ylim(0, top)
        ax2.legend(loc="upper left", fontsize=9)
    ax2.xaxis.set_major_formatter(FuncFormatter(_thousands))
    ax2.yaxis.set_major_formatter(FuncFormatter(_thousands))
    ax2.grid(True, alpha=0.3)
    ax2.set_xlabel("offered rate (events/s)")
    ax2.set_ylabel("delivered at the SMTP server (emails/s)")
    ax2.set_title("Relay: delivered vs offered, per rate step", fontsize=11)
    _save(fig, path)


PLOTTERS: Final[dict[str, list[tuple[str, Plotter]]]] = {
    "ingest": [("latency", ingest_latency), ("throughput", ingest_throughput)],
    "cache": [("latency", cache_latency), ("throughput", cache_throughput)],
    "content": [("latency", content_latency), ("throughput", content_throughput)],
    "relay": [("latency", relay_latency), ("throughput", relay_throughput)],
}
