"""Render a benchmark results file into docs/performance.md (table, ratios, floor) and a PNG chart.

    python -m bench.render_performance docs/bench-results/h100-2026-11-26.json

Each results file has its own block in docs/performance.md, between the `results:<file stem>:begin` /
`:end` markers (one run per card, each kept); only that block is rewritten, and the analysis around the
blocks is written by hand.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.floor import Workload, floor



def markers(key: str) -> tuple[str, str]:
    """The begin/end markers of one results file's block (key: the file's stem)."""
    return f"<!-- results:{key}:begin -->", f"<!-- results:{key}:end -->"


def busy_share(run: dict, busy_from: float = 50) -> str:
    """NVML busy share from the first sample at `busy_from`% on: start-up (weights, compile) is not the
    workload. A series averaged over N GPUs reads 100/N with one of them busy: lower `busy_from` for it."""
    series = run.get("gpu_util_series") or []
    start = next((i for i, value in enumerate(series) if value >= busy_from), None)
    if start is None:
        return "-"
    active = series[start:]
    return f"{sum(active) / len(active):.0f}%"


def _find(runs: list[dict], label: str, workload: str) -> dict | None:
    return next((r for r in runs if r.get("label") == label and r.get("workload") == workload), None)


def _rate(run: dict | None) -> str:
    return f"{run['requests_per_s']:.1f}" if run and "requests_per_s" in run else "not measured"


def _ratio(a: dict | None, b: dict | None) -> str:
    if not a or not b or "requests_per_s" not in a or "requests_per_s" not in b:
        return "not measured"
    return f"{a['requests_per_s'] / b['requests_per_s']:.2f}x"


def _counterpart(label: str, swap: tuple[str, str]) -> str:
    """The same run with its base's kind or precision swapped: pipeline-fp8+kv-fp8 -> pipeline-bf16+kv-fp8."""
    base, *knobs = label.split("+")
    return "+".join([base.replace(*swap), *knobs])


def _plain_counterpart(label: str, measured) -> str | None:
    """The measured plain vLLM run closest to a pipeline run: same precision, and of the engine-argument
    knobs the pipeline run has, the most (plain vLLM has no batch-side knobs). The ratio's name shows
    both labels, so a partial match is in plain sight."""
    base, *knobs = label.split("+")
    plain_base = base.replace("pipeline-", "plain-")
    candidates = [m for m in measured if m.split("+")[0] == plain_base and set(m.split("+")[1:]) <= set(knobs)]
    return max(candidates, key=lambda m: len(m.split("+")), default=None)


def measured_ratios(runs: list[dict]) -> list[tuple[str, str]]:
    """Every ratio the run allows, each between two runs of this one results file: pipeline vs plain vLLM
    (with the same engine arguments), FP8 vs BF16 (same settings), and each knob vs the default."""
    w1 = {r["label"]: r for r in runs if r.get("workload") == "W1"}
    text = {r["label"]: r for r in runs if r.get("workload") == "text"}
    ratios = []
    for label in sorted(w1):
        if label.startswith("pipeline-") and (plain := _plain_counterpart(label, w1)) is not None:
            ratios.append((f"{label} / {plain} (pipeline / plain vLLM), W1", _ratio(w1[label], w1[plain])))
    for label in sorted(w1):
        if "-fp8" in label.split("+")[0] and (bf16 := _counterpart(label, ("-fp8", "-bf16"))) in w1:
            ratios.append((f"{label} / {bf16} (FP8 / BF16), W1", _ratio(w1[label], w1[bf16])))
    for label in sorted(w1):
        if label.startswith("pipeline-") and (engine := label.replace("pipeline-", "engine-", 1)) in w1:
            ratios.append((f"{label} / {engine} (pipeline / its engine alone, all requests at once), W1",
                           _ratio(w1[label], w1[engine])))
    if "plain-fp8" in text and "plain-bf16" in text:
        ratios.append(("plain-fp8 / plain-bf16 (FP8 / BF16), text-only", _ratio(text["plain-fp8"], text["plain-bf16"])))
    for label in sorted(w1):
        base = label.split("+")[0]
        if "+" in label and base in w1:
            ratios.append((f"{label} / {base} (knobs vs default), W1", _ratio(w1[label], w1[base])))
    return ratios


def profiled_runs(runs: list[dict]) -> list[dict]:
    """The runs whose profile was summed per part (bench/profile_breakdown.py)."""
    return [r for r in runs if r.get("workload") == "W1-profiled" and r.get("kernel_breakdown")]


def kernel_tables(runs: list[dict], floors: dict) -> list[str]:
    """GPU kernel time per image by part, from each profiled run's trace (bench/profile_breakdown.py)."""
    lines = []
    for run in profiled_runs(runs):
        breakdown = run["kernel_breakdown"]
        if not breakdown.get("vision_scope_found"):
            # Stock vLLM's Gemma 3 opens no range around its vision tower: its GEMMs would read as the decoder's.
            lines += [f"`{run['label']}`'s profile ({breakdown['images']} requests) is of stock vLLM, whose vision "
                      f"tower cannot be told apart in it: {breakdown['kernel_ms_per_image']:.1f} ms of GPU kernels "
                      "per image in all.", ""]
            continue
        precision = "fp8" if "-fp8" in run["label"].split("+")[0] else "bf16"
        floor_ms = 1e3 / floors[precision]["serial_images_per_s"]
        lines += [
            f"GPU kernel time per image in `{run['label']}`'s profile ({breakdown['images']} requests, "
            f"{breakdown['kernels']:,} kernels; `python -m bench.profile_breakdown`): "
            f"{breakdown['kernel_ms_per_image']:.1f} ms in all, so a card running only these kernels back to "
            f"back gives **{breakdown['kernel_bound_images_per_s']:.1f} images/s**; the serial floor is "
            f"{floor_ms:.1f} ms ({floors[precision]['serial_images_per_s']:.0f} images/s).",
            "",
            "| part | ms per image | share | of it in prefill steps | in decode-only steps |",
            "|---|---|---|---|---|",
        ]
        steps = breakdown.get("ms_per_image_by_step", {})
        for part, ms in breakdown["ms_per_image"].items():
            prefill = steps.get("prefill steps", {}).get(part, 0.0)
            decode = steps.get("decode-only steps", {}).get(part, 0.0)
            lines.append(f"| {part} | {ms:.2f} | {breakdown['share'][part]:.0%} | {prefill:.2f} | {decode:.2f} |")
        lines.append("")
    return lines


def render(results: dict, chart: Path, key: str) -> str:
    runs = [r for r in results["runs"] if not r.get("failed")]
    ceilings = results.get("ceilings", {})
    card = ceilings.get("card") or (runs[0]["card"] if runs else "unknown card")
    vllm = runs[0].get("vllm", "?") if runs else "?"
    lanes = any("lane" in run for run in runs)
    rows = ["| configuration | workload | requests/s | generated tokens/s | GPU busy (NVML, while running) | engine start-up |"
            + (" GPU |" if lanes else ""), "|---|---|---|---|---|---|" + ("---|" if lanes else "")]
    for run in runs:
        if run.get("workload") not in ("W1", "text"):
            continue
        startup = run.get("startup_s") or run.get("first_output_after_s")
        rows.append(f"| {run['label']} ({run['engine']}) | {run['workload']} | {run['requests_per_s']:.1f} | "
                    f"{run.get('generated_tokens_per_s', 0):.0f} | {busy_share(run)} | "
                    f"{'-' if not startup else f'{startup:.0f} s'} |" + (f" {run.get('lane', 0)} |" if lanes else ""))
    missing = [r["label"] for r in results["runs"] if r.get("failed")]
    # Pipeline rates written before 2026-11-27 were a 10%-90% window, too high when the engine works in
    # waves (bench/pipeline_run.py): the block says which rate each pipeline row is.
    notes = sorted({r["rate_note"] for r in runs if r.get("rate_note")})
    rate_line = ("Pipeline rates: " + "; ".join(notes) + "." if notes else
                 "Pipeline rates: whole run, first row into the engine to the last out (`bench/pipeline_run.py`).")
    prompt_tokens = next((r["prompt_tokens_mean"] for r in runs if r.get("workload") == "W1"
                          and r.get("prompt_tokens_mean")), 329)
    work = Workload(prompt_tokens=int(prompt_tokens))
    floors = {p: floor(work, ceilings.get("bf16_matmul_tflops", 792), ceilings.get("fp8_matmul_tflops", 1432),
                       ceilings.get("copy_bandwidth_tb_s", 3.0), p == "fp8") for p in ("fp8", "bf16")}
    ratios = measured_ratios(runs)
    _chart(runs, floors, card, chart)
    begin, end = markers(key)
    lines = [
        begin,
        f"**Card:** {card} · **vLLM** {vllm} · **ceilings measured in the same run:** bf16 matmul "
        f"{ceilings.get('bf16_matmul_tflops')} TFLOP/s, fp8 matmul {ceilings.get('fp8_matmul_tflops')} TFLOP/s, "
        f"device copy {ceilings.get('copy_bandwidth_tb_s')} TB/s.",
        "",
        *rows,
        "",
        rate_line,
        "",
        "| ratio (same card, same run) | value |", "|---|---|",
        *[f"| {name} | {value} |" for name, value in ratios],
        "",
        f"Physical floor for W1 ({work.prompt_tokens}-token prompts incl. 256 image tokens, "
        f"{work.generated_tokens} generated, {work.concurrent_sequences} sequences decoding together; "
        "`python -m bench.floor`):",
        "",
        "| | vision tower (bf16) | prefill | decode compute | decode weight reads | decode KV reads | floor, serial | floor, overlapped |",
        "|---|---|---|---|---|---|---|---|",
        *[f"| {p.upper()} | {f['vision_ms']:.1f} ms | {f['prefill_ms']:.1f} ms | {f['decode_compute_ms']:.1f} ms | "
          f"{f['decode_weights_ms']:.1f} ms | {f['decode_kv_ms']:.1f} ms | {f['serial_images_per_s']:.0f} images/s | "
          f"{f['overlapped_images_per_s']:.0f} images/s |" for p, f in floors.items()],
        "",
        *kernel_tables(runs, floors),
        f"![W1 throughput]({chart.name})",
        "",
        (f"Did not finish in this run (the text below says why): {', '.join(missing)}." if missing else ""),
        "",
        f"Front-end image processor on this host, per 896 px image (`bench/frontend_cost.py`): stock "
        f"{results.get('frontend_cost', {}).get('stock_image_processor_ms', float('nan')):.2f} ms "
        f"({results.get('frontend_cost', {}).get('image_processor_class', '?')}), uint8 variant "
        f"{results.get('frontend_cost', {}).get('uint8_image_processor_ms', float('nan')):.2f} ms, stock processor "
        f"with the text {results.get('frontend_cost', {}).get('stock_processor_with_text_ms', float('nan')):.2f} ms.",
        end,
    ]
    return "\n".join(lines)


def _chart(runs: list[dict], floors: dict, card: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w1 = [r for r in runs if r.get("workload") == "W1"]
    # The rate a card running only the profiled kernels would give: the ceiling of those settings.
    kernel_bound = [(f"{r['label']} kernels alone (profile)", r["kernel_breakdown"]["kernel_bound_images_per_s"])
                    for r in profiled_runs(runs) if r["kernel_breakdown"].get("vision_scope_found")]
    labels = [r["label"] for r in w1] + [l for l, _ in kernel_bound] + ["floor FP8 (serial)", "floor FP8 (overlapped)"]
    values = [r["requests_per_s"] for r in w1] + [v for _, v in kernel_bound] + [
        floors["fp8"]["serial_images_per_s"], floors["fp8"]["overlapped_images_per_s"]]
    colours = (["#4C72B0" if l.startswith(("plain", "engine")) else "#DD8452" for l in labels[:len(w1)]]
               + ["#8C8C8C"] * len(kernel_bound) + ["#BBBBBB", "#888888"])
    figure, axis = plt.subplots(figsize=(9, 0.9 + 0.45 * len(labels)), dpi=110)
    bars = axis.barh(labels, values, color=colours)
    axis.bar_label(bars, fmt="%.1f", padding=3)
    axis.set_xlim(0, max(values + [45]) * 1.12)
    axis.axvline(45, color="#C44E52", linestyle="--", linewidth=1)
    axis.text(45.5, len(labels) - 0.55, "target 45", color="#C44E52", fontsize=8)
    axis.set_xlabel("images per second, workload W1 (896 px image + 24-token prompt, 128 tokens out)")
    axis.set_title(card, fontsize=10)
    axis.invert_yaxis()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_between_markers(doc: Path, begin: str, end: str, block: str) -> None:
    """Replace the part of `doc` from `begin` to `end` (the block includes both markers), appending the
    markers first if the doc lacks them; the hand-written text around them is kept."""
    text = doc.read_text() if doc.exists() else "# Performance\n"
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    doc.write_text(head + block + tail)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results")
    parser.add_argument("--doc", default="docs/performance.md")
    args = parser.parse_args(argv)
    doc = Path(args.doc)
    key = Path(args.results).stem
    chart = doc.parent / (key + "-w1.png")
    write_between_markers(doc, *markers(key), render(json.loads(Path(args.results).read_text()), chart, key))
    print(f"wrote {doc} and {chart}")


if __name__ == "__main__":
    main()
