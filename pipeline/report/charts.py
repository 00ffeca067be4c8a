"""The run report's charts, drawn with matplotlib into PNG bytes.

Figures are built with `matplotlib.figure.Figure` and its Agg canvas, never through `pyplot`, so no
process-wide backend or figure registry is touched (the report is drawn inside the job's driver).
Every function takes plain arrays and returns PNG bytes; an empty input draws a labelled empty chart
rather than failing, so the report always shows the same set of charts.
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np

PALETTE = {"rows": "#2563eb", "tokens": "#f59e0b", "latency": "#059669", "prompt": "#7c3aed",
           "completion": "#db2777", "errors": "#dc2626"}
DPI = 100


def _figure(width_in: float = 8.0, height_in: float = 3.6):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="#6b7280")
    ax.set_xticks([])
    ax.set_yticks([])


def throughput_chart(finished_s: Sequence[float], completion_tokens: Sequence[float], wall_s: float,
                     weight: int = 1) -> bytes:
    """Rows/s and generated tokens/s over the run (top), rows done so far (bottom).

    `finished_s`: each row's finish time in seconds since the run started; `completion_tokens`: that
    row's generated tokens (0 for error rows). Bins are 1/60 of the run, at least one second. `weight`:
    the rows each given row stands for (a 1-in-N sample of the output).
    """
    figure = _figure(8.0, 5.0)
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    times = np.asarray(finished_s, dtype=float)
    if times.size == 0:
        _empty(top, "no rows with a finish time")
        _empty(bottom, "")
        return _png(figure)
    end = max(float(wall_s), float(times.max()), 1.0)
    width = max(1.0, end / 60.0)
    edges = np.arange(0.0, end + width, width)
    rows, _ = np.histogram(times, bins=edges)
    rows = rows * weight
    tokens, _ = np.histogram(times, bins=edges, weights=np.asarray(completion_tokens, dtype=float) * weight)
    centers = (edges[:-1] + edges[1:]) / 2
    top.bar(centers, rows / width, width=width * 0.9, color=PALETTE["rows"], label="rows/s")
    top.set_ylabel("rows/s")
    top.set_title(f"Throughput over time ({width:.0f} s bins)")
    twin = top.twinx()
    twin.plot(centers, tokens / width, color=PALETTE["tokens"], marker=".", label="generated tokens/s")
    twin.set_ylabel("generated tokens/s")
    handles = top.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    top.legend(handles, ["rows/s", "generated tokens/s"], loc="upper left", fontsize="small")
    order = np.sort(times)
    bottom.step(order, np.arange(1, order.size + 1) * weight, where="post", color=PALETTE["rows"])
    bottom.set_ylabel("rows done")
    bottom.set_xlabel("seconds since the run started")
    bottom.set_xlim(0, end)
    bottom.grid(alpha=0.3)
    return _png(figure)


def latency_chart(latencies_s: Sequence[float]) -> bytes:
    """Histogram of engine latency per answered row, with p50 and p99 marked."""
    figure = _figure()
    ax = figure.subplots()
    values = np.asarray(latencies_s, dtype=float)
    if values.size == 0:
        _empty(ax, "no answered rows with an engine latency")
        return _png(figure)
    ax.hist(values, bins=min(40, max(5, values.size // 2)), color=PALETTE["latency"])
    for q, style in ((50, "--"), (99, ":")):
        value = float(np.percentile(values, q))
        ax.axvline(value, color="#111827", linestyle=style, label=f"p{q} {value:.2f} s")
    ax.set_title(f"Engine latency per answered row (n={values.size})")
    ax.set_xlabel("seconds (submission to Ray's engine stage -> last token)")
    ax.set_ylabel("rows")
    ax.legend(fontsize="small")
    return _png(figure)


def tokens_chart(prompt_tokens: Sequence[float], completion_tokens: Sequence[float]) -> bytes:
    """Histograms of prompt and generated tokens per answered row."""
    figure = _figure()
    left, right = figure.subplots(1, 2)
    for ax, values, name, color in ((left, prompt_tokens, "prompt tokens", PALETTE["prompt"]),
                                    (right, completion_tokens, "generated tokens", PALETTE["completion"])):
        array = np.asarray(values, dtype=float)
        if array.size == 0:
            _empty(ax, f"no {name}")
            continue
        ax.hist(array, bins=min(30, max(5, array.size // 2)), color=color)
        ax.set_title(f"{name} per row (mean {array.mean():.1f})")
        ax.set_xlabel("tokens")
        ax.set_ylabel("rows")
    return _png(figure)


def errors_chart(errors_by_kind: dict[str, int]) -> bytes:
    """Error rows by kind, largest first."""
    figure = _figure(8.0, max(2.2, 0.45 * len(errors_by_kind) + 1.2))
    ax = figure.subplots()
    if not errors_by_kind:
        _empty(ax, "no error rows")
        ax.set_title("Errors by kind")
        return _png(figure)
    kinds = sorted(errors_by_kind, key=lambda k: (errors_by_kind[k], k))
    counts = [errors_by_kind[k] for k in kinds]
    bars = ax.barh(kinds, counts, color=PALETTE["errors"])
    ax.bar_label(bars, labels=[f"{c:,}" for c in counts], padding=3, fontsize="small")
    ax.set_title(f"Errors by kind ({sum(counts):,} rows)")
    ax.set_xlabel("rows")
    ax.set_xlim(0, max(counts) * 1.15)
    return _png(figure)
