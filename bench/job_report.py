"""Render a job-level results file (bench/job_run.py) as markdown: one row per target, then ours / plain.

    python -m bench.job_report RESULTS.json

Ratios are taken only between targets of the same results file (one run, one card), per workload.
"""
from __future__ import annotations

import json
import sys
from typing import Any, Optional


def _num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def _ahead(point: Optional[dict]) -> str:
    if not point:
        return "-"
    return f"{point['ahead']:,} ({point['prepared']:,} - {point['generated']:,})"


def ratio(ours: Optional[float], plain: Optional[float]) -> Optional[float]:
    return round(ours / plain, 2) if ours and plain else None


def _x(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:,.2f}x"


def markdown(results: dict) -> str:
    meta = results.get("meta", {})
    lines = []
    if meta:
        data = ", ".join(f"{d['workload']} {d['rows']:,} rows ({d['bytes'] / 1e9:.2f} GB, written in {d['write_s']} s)"
                         for d in meta.get("dataset", []))
        lines += [f"Card: {meta.get('card')}, vLLM {meta.get('vllm')}, Ray {meta.get('ray')}; "
                  f"$ {meta.get('gpu_hourly_usd')}/GPU-hour; data: {data}.", ""]
    lines += ["| target | rows | errors | job wall s | engine start s | images/s (job) | images/s (job less start) "
              "| $ / 1M images (job) | steady images/s | steady window | ahead at open | ahead at close "
              "| prepared before window |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in results.get("runs", []):
        if run.get("failed"):
            lines.append(f"| {run['target']} | failed: {run['failed']} |" + " |" * 11)
            continue
        steady = run.get("steady") or {}
        window = (f"{_num(steady.get('open_s'))}-{_num(steady.get('close_s'))} s"
                  if steady.get("open_s") is not None else "-")
        lines.append(" | ".join([
            f"| {run['target']}", _num(run.get("rows")), _num(run.get("errors")), _num(run.get("wall_s")),
            _num(run.get("engine_start_s")), _num(run.get("images_per_s"), 2),
            _num(run.get("images_per_s_after_start"), 2), _num(run.get("usd_per_1m_images"), 2),
            _num(steady.get("rows_per_s"), 2), window, _ahead(steady.get("at_open")),
            _ahead(steady.get("at_close")), _num(steady.get("prepared_before_window")) + " |"]))
    by_target = {r["target"]: r for r in results.get("runs", []) if not r.get("failed")}
    pairs = [(w, by_target.get(f"ours-{w}"), by_target.get(f"plain-{w}")) for w in ("w1", "w2")]
    pairs = [(w, o, p) for w, o, p in pairs if o and p]
    if pairs:
        lines += ["", "| workload | ours / plain, job (images/s incl. engine start) | ours / plain, job less engine start "
                  "| ours steady / plain job less start |", "|---|---|---|---|"]
        for w, o, p in pairs:
            steady = (o.get("steady") or {}).get("rows_per_s")
            lines.append(f"| {w.upper()} | {_x(ratio(o.get('images_per_s'), p.get('images_per_s')))} "
                         f"| {_x(ratio(o.get('images_per_s_after_start'), p.get('images_per_s_after_start')))} "
                         f"| {_x(ratio(steady, p.get('images_per_s_after_start')))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as handle:
        print(markdown(json.load(handle)))


if __name__ == "__main__":
    main()
