"""Verify an FP8-dynamic checkpoint against its bf16 source, tensor by tensor, and write the report.

What makes the checkpoint trustworthy is measured here rather than assumed: every quantized Linear is
float8_e4m3fn `[out, in]` with a `[out, 1]` scale and its dequantized weights are compared with the
source (relative Frobenius error, ||W - s * q||_F / ||W||_F); every other tensor must be bit-identical to
the source; no tensor may be lost or invented. Shards are read lazily through safetensors' memory map,
one tensor pair at a time, so a 12B model is never whole in RAM.

torch and safetensors are imported inside the functions: `import pipeline.quantize.verify` stays light.
"""
from __future__ import annotations

import json
import logging
import math
import statistics
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from pipeline.batch import manifest
from pipeline.engine.checkpoint_layout import INDEX_NAME, to_google_name

logger = logging.getLogger(__name__)

REPORT_JSON = "quantization_report.json"
REPORT_MD = "quantization_report.md"
# Round-to-nearest to e4m3 (3 mantissa bits) is off by at most 2^-4 of a value in the normal range, so
# a layer's relative error above that means something other than rounding went wrong. Real Gemma 3
# layers sit near 2.6e-2 (docs/notes.md: FP8-dynamic with llm-compressor).
DEFAULT_MAX_LAYER_ERROR = 2.0 ** -4
QUANTIZE_PACKAGES = ("gemma3-fp8-pipeline", "llmcompressor", "compressed-tensors", "torch", "transformers",
                     "safetensors")


def package_versions() -> dict[str, str]:
    return manifest.package_versions(QUANTIZE_PACKAGES)


def weight_map(checkpoint_dir: Path) -> dict[str, str]:
    """Tensor name -> shard file name, from the index when there is one, else from the shards' headers."""
    index = checkpoint_dir / INDEX_NAME
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    mapping: dict[str, str] = {}
    for shard in sorted(checkpoint_dir.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as handle:
            mapping.update({name: shard.name for name in handle.keys()})
    return mapping


def shard_bytes(checkpoint_dir: Path) -> int:
    return sum(p.stat().st_size for p in checkpoint_dir.glob("*.safetensors"))


def kept_category(tensor: str) -> str:
    """Which part of Gemma 3 a tensor that stayed in its source dtype belongs to (for the report)."""
    module = tensor.rsplit(".", 1)[0]
    if "vision_tower" in tensor:
        return "vision tower"
    if "multi_modal_projector" in tensor:
        return "multimodal projector"
    if "lm_head" in tensor:
        return "lm_head"
    if "embed_tokens" in tensor:
        return "embeddings"
    if module.endswith("norm"):
        return "norms"
    return "other"


class _Shards:
    """Lazily opened safetensors handles of one checkpoint directory."""

    def __init__(self, directory: Path, mapping: dict[str, str], stack: ExitStack):
        self._directory, self._mapping, self._stack = directory, mapping, stack
        self._handles: dict[str, Any] = {}

    def get(self, name: str):
        from safetensors import safe_open

        file = self._mapping[name]
        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(safe_open(str(self._directory / file), "pt"))
        return self._handles[file].get_tensor(name)


def _bit_identical(a, b) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    import torch

    return torch.equal(a.contiguous().flatten().view(torch.uint8), b.contiguous().flatten().view(torch.uint8))


def relative_error(weight, quantized, scale) -> float:
    """||W - scale * q||_F / ||W||_F in float32 (0 for an all-zero W that dequantizes to zeros)."""
    reference = weight.float()
    difference = reference - quantized.float() * scale.float()
    norm = reference.norm().item()
    return difference.norm().item() / norm if norm > 0 else difference.norm().item()


def verify_checkpoint(source_dir: Path, output_dir: Path,
                      max_layer_error: float = DEFAULT_MAX_LAYER_ERROR) -> dict[str, Any]:
    """Compare every tensor of `output_dir` with `source_dir`; returns the report's measured sections."""
    import torch

    source_map, output_map = weight_map(source_dir), weight_map(output_dir)
    # The output is written in Google's SigLIP layout whatever the source's (pipeline.engine.checkpoint_layout):
    # each output tensor is compared with the source tensor of the same name in that layout.
    source_names = {to_google_name(name): name for name in source_map}
    layers: list[dict[str, Any]] = []
    kept: dict[str, list[str]] = defaultdict(list)
    problems: list[str] = []
    with ExitStack() as stack:
        source, output = _Shards(source_dir, source_map, stack), _Shards(output_dir, output_map, stack)
        for name in sorted(output_map):
            if name.endswith(".weight_scale"):
                continue
            if name not in source_names:
                problems.append(f"{name}: in the output but not in the source")
                continue
            original, written = source.get(source_names[name]), output.get(name)
            scale_name = name.removesuffix("weight") + "weight_scale"
            if name.endswith(".weight") and scale_name in output_map:
                scale = output.get(scale_name)
                layer = {"module": name.removesuffix(".weight"), "shape": list(original.shape),
                         "dtype": str(written.dtype).removeprefix("torch."),
                         "scale_shape": list(scale.shape)}
                out_features = original.shape[0] if original.ndim == 2 else None
                if written.dtype != torch.float8_e4m3fn or written.shape != original.shape or original.ndim != 2:
                    problems.append(f"{name}: expected float8_e4m3fn {list(original.shape)}, got "
                                    f"{layer['dtype']} {list(written.shape)}")
                    continue
                if list(scale.shape) != [out_features, 1]:
                    problems.append(f"{scale_name}: expected a per-channel scale [{out_features}, 1], got "
                                    f"{list(scale.shape)}")
                    continue
                layer["relative_error"] = relative_error(original, written, scale)
                if not math.isfinite(layer["relative_error"]) or layer["relative_error"] > max_layer_error:
                    problems.append(f"{layer['module']}: relative error {layer['relative_error']:.3e} "
                                    f"above {max_layer_error:.3e}")
                layers.append(layer)
            elif _bit_identical(original, written):
                kept[kept_category(name)].append(name)
            else:
                problems.append(f"{name}: not quantized, yet differs from the source ({original.dtype} "
                                f"{list(original.shape)} -> {written.dtype} {list(written.shape)})")
    for name in sorted(set(source_names) - set(output_map)):
        problems.append(f"{name}: in the source but missing from the output")
    errors = [layer["relative_error"] for layer in layers]
    before, after = shard_bytes(source_dir), shard_bytes(output_dir)
    lm_head_tied = not any("lm_head" in name for name in source_map)
    logger.info("verified %d quantized layers (max relative error %.3e), %d tensors bit-identical, %d problems",
                len(layers), max(errors, default=0.0), sum(map(len, kept.values())), len(problems))
    return {
        "passed": not problems,
        "problems": problems,
        "max_layer_error_allowed": max_layer_error,
        "quantized_layers": {
            "count": len(layers),
            "relative_error_max": max(errors, default=None),
            "relative_error_mean": statistics.fmean(errors) if errors else None,
            "relative_error_median": statistics.median(errors) if errors else None,
        },
        "bytes": {"before": before, "after": after, "ratio": round(after / before, 4) if before else None},
        "kept_in_source_dtype": {
            "tensors_by_part": {part: len(names) for part, names in sorted(kept.items())},
            "lm_head": "tied to the token embeddings (no tensor of its own)" if lm_head_tied else "kept",
            "tensors": {part: names for part, names in sorted(kept.items())},
        },
        "layers": layers,
    }


def write_report(report: dict[str, Any], directory: Path) -> tuple[Path, Path]:
    """Write the report as JSON (for machines) and Markdown (for people) into the checkpoint directory."""
    json_path, md_path = directory / REPORT_JSON, directory / REPORT_MD
    json_path.write_text(json.dumps(report, indent=2, default=str))
    md_path.write_text(render_markdown(report))
    return json_path, md_path


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f} MB"


def _layout(layout: dict[str, Any] | None) -> str:
    if not layout:
        return "as the source"
    renamed = layout["siglip_tensors_renamed"]
    return ("Google's (`vision_tower.vision_model.*`), as the source" if not renamed else
            f"Google's: {renamed} SigLIP tensors renamed from transformers 5's `vision_tower.*` so that vLLM loads them")


def render_markdown(report: dict[str, Any]) -> str:
    check, summary = report["check"], report["check"]["quantized_layers"]
    kept = report["check"]["kept_in_source_dtype"]
    sizes = report["check"]["bytes"]
    timings = ", ".join(f"{k} {v:.1f} s" for k, v in report["timings_s"].items())
    status = "passed" if check["passed"] else f"FAILED ({len(check['problems'])} problems)"
    error = (f"max {summary['relative_error_max']:.3e}, mean {summary['relative_error_mean']:.3e} "
             f"(limit {check['max_layer_error_allowed']:.3e})") if summary["count"] else "none"
    parts = ", ".join(f"{part} ({count} tensors)" for part, count in kept["tensors_by_part"].items())
    lines = [
        "# FP8-dynamic quantization report",
        "",
        "| | |",
        "|---|---|",
        f"| source | `{report['source']}` |",
        f"| output | `{report['output']}` |",
        f"| scheme | {report['scheme_description']} |",
        f"| verification | {status} |",
        f"| quantized Linear layers | {summary['count']}; relative error of dequantized weights: {error} |",
        f"| weights (safetensors) | {_mb(sizes['before'])} -> {_mb(sizes['after'])} ({sizes['ratio']}x) |",
        f"| kept in bf16, bit-identical | {parts}; lm_head {kept['lm_head']} |",
        f"| ignore patterns | {', '.join(f'`{p}`' for p in report['ignore'])} |",
        f"| tensor layout | {_layout(report.get('layout'))} |",
        f"| versions | {', '.join(f'{k} {v}' for k, v in report['versions'].items())} |",
        f"| wall time | {report['wall_s']:.1f} s ({timings}) |",
        "",
    ]
    if check["problems"]:
        lines += ["## Problems", ""] + [f"- {p}" for p in check["problems"]] + [""]
    lines += ["## Per-layer error", "", "| layer | shape [out, in] | relative error |", "|---|---|---|"]
    lines += [f"| `{layer['module']}` | {layer['shape']} | {layer['relative_error']:.3e} |"
              for layer in check["layers"]]
    return "\n".join(lines) + "\n"
