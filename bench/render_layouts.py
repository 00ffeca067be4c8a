"""Render an engine-layout results file (TP=N vs N x TP=1 on one node) into docs/performance.md.

    python -m bench.render_layouts docs/bench-results/h100x4-2026-11-26.json

Only the part between the `layouts:begin` / `layouts:end` markers is rewritten; the reasoning and the
defaults chosen from it are written by hand around it.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from bench.online_latency import parse_layout
from bench.render_performance import busy_share, write_between_markers

BEGIN, END = "<!-- layouts:begin -->", "<!-- layouts:end -->"
LAYOUT = re.compile(r"-(tp\d+|\d+x\d+)$")


def layout_of(run: dict) -> str | None:
    """'pipeline-fp8-tp4' -> 'tp4'; online results carry their layout (subsets included)."""
    if run.get("layout"):
        return run["layout"]
    match = LAYOUT.search(run.get("label", ""))
    return match.group(1) if match else None


def gpus_of(layout: str) -> int:
    servers, tp = parse_layout(layout)
    return servers * tp


def describe(layout: str) -> str:
    if layout.startswith("tp"):
        return f"one engine, TP={parse_layout(layout)[1]}"
    servers, tp = parse_layout(layout)
    return f"{servers} x TP={tp} replicas"


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def render(results: dict) -> str:
    runs = [r for r in results["runs"] if not r.get("failed") and layout_of(r)]
    card = results.get("ceilings", {}).get("card") or (runs[0].get("card") if runs else "unknown card")
    vllm = next((r["vllm"] for r in runs if r.get("vllm")), "?")
    batch = sorted((r for r in runs if r.get("workload") == "W1"), key=lambda r: (gpus_of(layout_of(r)), layout_of(r)))
    online = sorted((r for r in runs if r.get("workload") == "W1-online"),
                    key=lambda r: (gpus_of(layout_of(r)), layout_of(r), r["streams"]))
    lines = [BEGIN, f"**Node:** {card} x {max((gpus_of(layout_of(r)) for r in runs), default='?')} · **vLLM** {vllm} · "
             "FP8 checkpoint, workload W1, every number from the same run on the same node.", ""]
    lines += ["Batch (our pipeline, `bench/pipeline_run.py`; steady rate between 10% and 90% of rows):", "",
              "| layout | GPUs | images/s | images/s per GPU | GPU busy, mean (each GPU) | engine start-up |",
              "|---|---|---|---|---|---|"]
    by_layout = {}
    for run in batch:
        layout = layout_of(run)
        by_layout[layout] = run
        gpus = gpus_of(layout)
        startup = run.get("first_output_after_s")
        each = run.get("gpu_util_per_gpu")
        busy = busy_share(run, busy_from=25) + (f" ({', '.join(f'{u:.0f}%' for u in each)})" if each else "")
        lines.append(f"| {describe(layout)} | {gpus} | {run['requests_per_s']:.1f} | {run['requests_per_s'] / gpus:.1f} | "
                     f"{busy} | {'-' if startup is None else f'{startup:.0f} s'} |")
    ratios = []
    for n in (4, 2):
        tp, replicas = by_layout.get(f"tp{n}"), by_layout.get(f"{n}x1")
        if tp and replicas:
            ratios.append(f"{n} x TP=1 / TP={n}: **{replicas['requests_per_s'] / tp['requests_per_s']:.2f}x** images/s")
    lines += ["", ("Measured side by side: " + "; ".join(ratios) + ".") if ratios else "", ""]
    lines += ["Online (vLLM's OpenAI server per engine, clients spread round-robin, streamed, "
              "`bench/online_latency.py`):", "",
              "| layout | concurrent streams | requests/s | latency p50 | latency p99 | time to first token p50 | TTFT p99 | errors |",
              "|---|---|---|---|---|---|---|---|"]
    for run in online:
        subset = " (of the started servers)" if "started)" in run.get("engine", "") else ""
        lines.append(f"| {describe(layout_of(run))}{subset} | {run['streams']} | {run['requests_per_s']:.2f} | "
                     f"{_ms(run.get('latency_p50_s'))} | {_ms(run.get('latency_p99_s'))} | {_ms(run.get('ttft_p50_s'))} | "
                     f"{_ms(run.get('ttft_p99_s'))} | {run.get('errors', 0)} |")
    missing = [r["label"] for r in results["runs"] if r.get("failed")]
    if missing:
        lines += ["", f"Failed in this run (the text below says why): {', '.join(missing)}."]
    lines.append(END)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results")
    parser.add_argument("--doc", default="docs/performance.md")
    args = parser.parse_args(argv)
    doc = Path(args.doc)
    write_between_markers(doc, BEGIN, END, render(json.loads(Path(args.results).read_text())))
    print(f"wrote {doc}")


if __name__ == "__main__":
    main()
