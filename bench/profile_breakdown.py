"""Where an engine's GPU time goes, per image: a torch profiler trace summed by part of the model.

    python -m bench.profile_breakdown PROFILE_DIR --images 512 [--json OUT.json]

Reads the Chrome trace that vLLM's torch profiler writes (`profiler_config`, one `*.pt.trace.json[.gz]`
per engine process) and sums the GPU kernels' time into the parts that docs/performance.md and the
floor (`bench.floor`) talk about:

- the vision tower and projector: every kernel launched inside the `VISION_SCOPE` range that our Gemma 3
  variant (`pipeline.engine.gemma3`) opens around its image path, split into its GEMMs, its attention
  and the rest (layer norms, GELU, adds: run eagerly);
- the decoder's attention (vLLM's Triton `unified_attention`, the one backend it allows Gemma 3 with images)
  and its KV-cache writes;
- the decoder's GEMMs (FP8 CUTLASS scaled-mm or bf16 cuBLAS, lm_head included);
- the fused Triton kernels torch.compile makes of the rest of the decoder (norms, rotary, residuals and,
  in FP8, the per-token activation quantisation);
- sampling, copies, and anything else.

Each part is also split by the engine step it ran in: steps with new prompt tokens (prefill, images)
against decode-only steps, from vLLM's own per-step ranges (`execute_context_N(..)_generation_M(..)`).
A kernel is attributed to a CPU range through the launch that made it (the trace's `correlation` id):
the GPU runs kernels later than the CPU launches them, so time stamps alone would not do.

The per-image sum is the GPU time the engine needs per image at those settings; its inverse is the
rate of a card kept busy with exactly those kernels, the ceiling the measured rate can be held against.
"""
from __future__ import annotations

import argparse
import bisect
import gzip
import json
import re
from collections import defaultdict
from pathlib import Path

# Opened by pipeline.engine.gemma3 around the image path (a constant here too: this module must not need vLLM).
VISION_SCOPE = "gemma3: vision tower and projector"
STEP_RANGE = re.compile(r"^execute_context_(\d+)\(\d+\)_generation_(\d+)\(\d+\)$")

PARTS = [
    "vision GEMMs", "vision attention", "vision other",
    "decoder attention", "KV-cache writes", "decoder GEMMs", "decoder fused Triton (norms, quantisation)",
    "sampling", "copies", "other",
]


def _is_gemm(name: str) -> bool:
    """CUTLASS, cuBLAS (nvjet, xmma) and other GEMM kernels, by their lower-case names."""
    return any(mark in name for mark in ("gemm", "nvjet", "xmma", "cublas"))


def part_of(kernel: str, in_vision: bool) -> str:
    """The part a GPU kernel belongs to, by where it was launched and what it is called."""
    name = kernel.lower()
    if in_vision:
        if "flash" in name or "fmha" in name or "attention" in name:
            return "vision attention"
        if _is_gemm(name):
            return "vision GEMMs"
        return "vision other"
    # vLLM gives Gemma 3's decoder Triton attention only; FlashAttention outside our range is unattributed.
    if "unified_attention" in name:
        return "decoder attention"
    if "reshape_and_cache" in name or "kv_cache" in name:
        return "KV-cache writes"
    # Before GEMMs: torch.compile names its fusions after the ops they hold, cutlass_scaled_mm among them.
    if name.startswith("triton_"):
        return "decoder fused Triton (norms, quantisation)"
    if _is_gemm(name) or "scaled_mm" in name:
        return "decoder GEMMs"
    if "sample" in name or "topk" in name or "top_k" in name or "softmax" in name or "argmax" in name:
        return "sampling"
    if name.startswith("memcpy") or name.startswith("memset"):
        return "copies"
    return "other"


class _Ranges:
    """Sorted, non-overlapping time ranges of one CPU thread, each with a label."""

    def __init__(self, ranges: list[tuple[float, float, str]]):
        self._ranges = sorted(ranges)
        self._starts = [start for start, _, _ in self._ranges]

    def label_at(self, ts: float) -> str | None:
        i = bisect.bisect_right(self._starts, ts) - 1
        if i >= 0:
            start, end, label = self._ranges[i]
            if ts <= end:
                return label
        return None


def load_events(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def breakdown(events: list[dict], images: int) -> dict:
    """GPU kernel time by part and by step kind, in total and per image, with the GPU's busy share."""
    vision: dict[tuple, list] = defaultdict(list)
    steps: dict[tuple, list] = defaultdict(list)
    launches: dict[int, tuple] = {}  # correlation id -> (pid, tid, ts) of the CPU-side launch
    kernels = []
    for event in events:
        if event.get("ph") != "X":
            continue
        category, name = event.get("cat", ""), event.get("name", "")
        thread = (event.get("pid"), event.get("tid"))
        if category == "user_annotation":
            if name == VISION_SCOPE:
                vision[thread].append((event["ts"], event["ts"] + event.get("dur", 0), name))
            elif (match := STEP_RANGE.match(name)):
                kind = "prefill steps" if int(match.group(1)) > 0 else "decode-only steps"
                steps[thread].append((event["ts"], event["ts"] + event.get("dur", 0), kind))
        elif category in ("cuda_runtime", "cuda_driver"):
            correlation = event.get("args", {}).get("correlation")
            if correlation is not None:
                launches[correlation] = (*thread, event["ts"])
        elif category in ("kernel", "gpu_memcpy", "gpu_memset"):
            kernels.append(event)
    vision_ranges = {thread: _Ranges(r) for thread, r in vision.items()}
    step_ranges = {thread: _Ranges(r) for thread, r in steps.items()}

    by_part: dict[str, float] = defaultdict(float)
    by_step: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    intervals = []
    for kernel in kernels:
        duration = float(kernel.get("dur", 0))
        launch = launches.get(kernel.get("args", {}).get("correlation"))
        in_vision, step = False, "outside any step"
        if launch is not None:
            pid, tid, ts = launch
            in_vision = (pid, tid) in vision_ranges and vision_ranges[(pid, tid)].label_at(ts) is not None
            if (pid, tid) in step_ranges:
                step = step_ranges[(pid, tid)].label_at(ts) or step
        name = kernel.get("name", "")
        if kernel.get("cat") != "kernel":
            name = "memcpy " + name if kernel.get("cat") == "gpu_memcpy" else "memset " + name
        part = part_of(name, in_vision)
        by_part[part] += duration
        by_step[step][part] += duration
        intervals.append((float(kernel["ts"]), float(kernel["ts"]) + duration))

    busy_us, span_us = _union_and_span(intervals)
    total_us = sum(by_part.values())
    per_image = max(images, 1)
    return {
        "images": images,
        "kernels": len(kernels),
        "kernel_ms": round(total_us / 1e3, 3),
        "kernel_ms_per_image": round(total_us / 1e3 / per_image, 4),
        "gpu_span_ms": round(span_us / 1e3, 3),
        "gpu_busy_share": round(busy_us / span_us, 3) if span_us else None,
        # A card running nothing but these kernels, back to back.
        "kernel_bound_images_per_s": round(per_image / (total_us / 1e6), 2) if total_us else None,
        "ms_per_image": {part: round(by_part[part] / 1e3 / per_image, 4) for part in PARTS if by_part.get(part)},
        "share": {part: round(by_part[part] / total_us, 3) for part in PARTS if by_part.get(part)},
        "ms_per_image_by_step": {step: {part: round(v / 1e3 / per_image, 4) for part, v in parts.items()}
                                 for step, parts in sorted(by_step.items())},
        "vision_scope_found": bool(vision_ranges),
        "step_ranges_found": bool(step_ranges),
    }


def _union_and_span(intervals: list[tuple[float, float]]) -> tuple[float, float]:
    if not intervals:
        return 0.0, 0.0
    intervals.sort()
    busy, (current_start, current_end) = 0.0, intervals[0]
    for start, end in intervals[1:]:
        if start > current_end:
            busy += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    busy += current_end - current_start
    return busy, intervals[-1][1] - intervals[0][0]


def trace_files(profile_dir: Path) -> list[Path]:
    return sorted(p for p in Path(profile_dir).rglob("*") if p.name.endswith((".pt.trace.json", ".pt.trace.json.gz")))


def summarise_dir(profile_dir: Path, images: int) -> dict:
    """The breakdown of the trace in `profile_dir` with the most GPU kernels (the engine core's; the
    front-end's own trace, if any, has none)."""
    best = None
    for path in trace_files(profile_dir):
        result = breakdown(load_events(path), images)
        result["trace"] = path.name
        if best is None or result["kernels"] > best["kernels"]:
            best = result
    if best is None:
        raise FileNotFoundError(f"no *.pt.trace.json[.gz] under {profile_dir}")
    return best


def markdown(result: dict) -> str:
    lines = ["| part | GPU ms per image | share |", "|---|---|---|"]
    for part, ms in result["ms_per_image"].items():
        lines.append(f"| {part} | {ms:.2f} | {result['share'][part]:.0%} |")
    lines.append(f"| **all kernels** | **{result['kernel_ms_per_image']:.2f}** | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile_dir", type=Path)
    parser.add_argument("--images", type=int, required=True, help="images the profiled requests carried")
    parser.add_argument("--json", type=Path, help="also write the breakdown here")
    args = parser.parse_args(argv)
    result = summarise_dir(args.profile_dir, args.images)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(markdown(result))
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}))
    return result


if __name__ == "__main__":
    main()
