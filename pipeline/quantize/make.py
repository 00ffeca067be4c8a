"""Make an FP8-dynamic checkpoint from a bf16 Gemma 3 (or a fine-tune of it), verify it, and publish it.

    SRC (dir, s3://, Hugging Face id) --download--> llm-compressor `model_free_ptq` (FP8_DYNAMIC, data-free,
    shard by shard) --> SigLIP tensors in Google's layout (what vLLM loads) --> verify every tensor
    against the source + report --> DST (dir or s3://)

FP8_DYNAMIC: weights float8_e4m3fn, one scale per output channel, symmetric, round-to-nearest, no
calibration data; activations quantized per token at run time by the engine. `model_free_ptq` reads one
safetensors shard at a time, so the 12B model is never whole in RAM (`oneshot` held 24.4 GB, docs/notes.md: FP8-dynamic with llm-compressor).

This runs in its own environment (`.venv-quantize`, the `quantize` extra): llm-compressor pins
compressed-tensors 0.19, vLLM 0.29 pins 0.17 (docs/notes.md: Versions). llm-compressor is imported inside
`quantize_shards` only, so this module imports anywhere and the batch/serve code never imports it.
"""
from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from pipeline.engine.checkpoint import inspect_checkpoint
from pipeline.engine.checkpoint_layout import to_google_layout
from pipeline.config import StorageSection
from pipeline.quantize.verify import (DEFAULT_MAX_LAYER_ERROR, REPORT_JSON, REPORT_MD, package_versions,
                              verify_checkpoint, write_report)
from pipeline.io.storage import download_prefix, is_s3, make_filesystem, upload_dir

logger = logging.getLogger(__name__)

# Regexes, not names: llm-compressor would write exact names in the checkpoint's layout, which
# transformers does not match on reload, so it quantizes the vision tower and image logits are NaN
# (docs/notes.md: FP8-dynamic with llm-compressor). `model_free_ptq` treats every 2-D tensor called `weight` as a Linear unless ignored, hence
# the embeddings too (llm-compressor's own model_free examples ignore `model.embed_tokens`).
FP8_DYNAMIC_IGNORE = (
    "re:.*lm_head",
    "re:.*embed_tokens",
    "re:.*vision_tower.*",
    "re:.*multi_modal_projector.*",
)
SCHEME = "FP8_DYNAMIC"
SCHEME_DESCRIPTION = ("FP8_DYNAMIC (compressed-tensors float-quantized): weights float8_e4m3fn, one scale per "
                      "output channel, symmetric, round-to-nearest, no calibration data; activations "
                      "quantized per token at run time")


class QuantizeError(ValueError):
    """The source or the output cannot be used; raised before anything is quantized."""


class VerificationError(RuntimeError):
    """The checkpoint was made but failed verification; it was not published."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class QuantizeOptions:
    ignore: tuple[str, ...] = FP8_DYNAMIC_IGNORE
    # 'cpu', 'cuda:0', ...; None lets llm-compressor spread shards over every visible GPU, else use the CPU.
    device: Optional[str] = None
    # Shards quantized at once; each holds one shard's tensors (about 5 GB for Gemma-3-12b-it) in memory.
    max_workers: int = 1
    max_layer_error: float = DEFAULT_MAX_LAYER_ERROR
    # Staging directory: the bf16 download from s3:// and the new checkpoint before it is published. None:
    # next to a local output (so publishing is a rename), else the system's temporary directory.
    work_dir: Optional[Path] = None
    overwrite: bool = False


def run_quantize(source: str, output: str, storage: StorageSection,
                 options: Optional[QuantizeOptions] = None) -> dict[str, Any]:
    """Quantize `source` into `output`, verify it, write the report next to it; returns the report."""
    options = options or QuantizeOptions()
    started = time.time()
    _check_source(source, storage)
    _check_output(source, output, storage, options.overwrite)
    _check_environment()
    staging = _staging_dir(output, options.work_dir)
    keep_staging = False
    try:
        timings: dict[str, float] = {}
        tick = time.time()
        source_dir = _local_source(source, storage, staging / "source")
        timings["download"] = time.time() - tick
        output_dir = staging / "output"

        tick = time.time()
        quantize_shards(source_dir, output_dir, options)
        # vLLM loads SigLIP only under Google's names; transformers 5 saves it under others.
        renamed = to_google_layout(output_dir)
        timings["quantize"] = time.time() - tick
        tick = time.time()
        check = verify_checkpoint(source_dir, output_dir, options.max_layer_error)
        timings["verify"] = time.time() - tick

        report: dict[str, Any] = {
            "source": source, "output": output, "scheme": "fp8-dynamic",
            "scheme_description": SCHEME_DESCRIPTION, "ignore": list(options.ignore),
            "device": options.device or "auto", "versions": package_versions(), "check": check,
            "layout": {"siglip": "google", "siglip_tensors_renamed": renamed},
        }
        if not check["passed"]:
            _finish(report, started, timings)
            write_report(report, output_dir)
            keep_staging = True
            raise VerificationError(
                f"the checkpoint failed verification and was not published to {output}; it and its report "
                f"are in {output_dir}: " + "; ".join(check["problems"][:5]), report)
        _publish(output_dir, output, storage, report, started, timings, time.time())
    finally:
        if not keep_staging:
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("wrote %s: %d layers quantized, max relative error %.3e, %.2f GB -> %.2f GB, %.1fs", output,
                check["quantized_layers"]["count"], check["quantized_layers"]["relative_error_max"] or 0.0,
                check["bytes"]["before"] / 1e9, check["bytes"]["after"] / 1e9, report["wall_s"])
    return report


def quantize_shards(source_dir: Path, output_dir: Path, options: QuantizeOptions) -> None:
    """llm-compressor's data-free FP8_DYNAMIC, one safetensors shard at a time.

    `model_free_ptq` also copies every non-weight file (config, tokenizer, processor, chat template),
    writes `quantization_config` into config.json and rewrites the safetensors index.
    """
    from llmcompressor import model_free_ptq  # the quantize environment only (docs/notes.md: Versions)

    model_free_ptq(model_stub=str(source_dir), save_directory=str(output_dir), scheme=SCHEME,
                   ignore=list(options.ignore), max_workers=options.max_workers, device=options.device)


def _check_environment() -> None:
    """Fail before any download when llm-compressor is missing (e.g. run from the vLLM environment)."""
    if importlib.util.find_spec("llmcompressor") is None:
        raise QuantizeError("llm-compressor is not installed in this environment; run jobs.quantize with the "
                            "quantize environment (`make quantize-env`, then .venv-quantize/bin/python) or "
                            "a runtime_env with the `quantize` extra (docs/quantize.md)")


def _check_source(source: str, storage: StorageSection) -> None:
    info = inspect_checkpoint(source, storage)
    if info.scheme != "none":
        raise QuantizeError(f"{source} is already quantized ({info.scheme}); jobs.quantize needs the bf16 "
                            "checkpoint it came from")
    if info.architecture not in ("Gemma3ForConditionalGeneration", "Gemma3ForCausalLM"):
        logger.warning("%s is a %s, not Gemma 3: the ignore patterns were written for Gemma 3", source,
                       info.architecture)


def _check_output(source: str, output: str, storage: StorageSection, overwrite: bool) -> None:
    import pyarrow.fs as pafs

    if source.rstrip("/") == output.rstrip("/") or (
            not is_s3(output) and Path(source).exists() and Path(source).resolve() == Path(output).resolve()):
        raise QuantizeError(f"--output {output} is the source checkpoint; write the FP8 one elsewhere")

    fs, path = make_filesystem(storage, output)
    existing = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    if existing and not overwrite:
        raise QuantizeError(f"{output} already holds {len(existing)} entries; pass --overwrite to replace them")


def _staging_dir(output: str, work_dir: Optional[Path]) -> Path:
    if work_dir is None and not is_s3(output):
        parent = Path(output).resolve().parent
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{Path(output).name}.partial-", dir=parent))
    return Path(tempfile.mkdtemp(prefix="quantize-", dir=work_dir))


def _local_source(source: str, storage: StorageSection, staging: Path) -> Path:
    """A local directory holding the source checkpoint: as given, downloaded from S3, or from the Hub cache."""
    if is_s3(source):
        download_prefix(storage, source, staging)
        local = staging
    elif Path(source).is_dir():
        local = Path(source)
    else:
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(source))
    if not any(local.glob("*.safetensors")):
        raise QuantizeError(f"{source} has no *.safetensors shards (model_free_ptq reads safetensors only)")
    return local


def _publish(output_dir: Path, output: str, storage: StorageSection, report: dict[str, Any], started: float,
             timings: dict[str, float], tick: float) -> None:
    """Move or upload the verified checkpoint, then write the report with the final timings. On S3,
    config.json goes last, so a half-published prefix never looks like a checkpoint to
    `inspect_checkpoint`."""
    fs, path = make_filesystem(storage, output)
    fs.delete_dir_contents(path, missing_dir_ok=True)  # only reached when empty or --overwrite
    if is_s3(output):
        last = ["config.json", REPORT_JSON, REPORT_MD]
        files = sorted(p.relative_to(output_dir).as_posix() for p in output_dir.rglob("*") if p.is_file())
        upload_dir(storage, output_dir, output, [f for f in files if f not in last])
        timings["upload"] = time.time() - tick
        _finish(report, started, timings)
        write_report(report, output_dir)
        upload_dir(storage, output_dir, output, [REPORT_JSON, REPORT_MD, "config.json"])
        return
    target = Path(path)
    if target.exists():
        target.rmdir()  # emptied above
    shutil.move(str(output_dir), str(target))
    timings["publish"] = time.time() - tick
    _finish(report, started, timings)
    write_report(report, target)


def _finish(report: dict[str, Any], started: float, timings: dict[str, float]) -> None:
    report["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    report["started"] = datetime.fromtimestamp(started, tz=timezone.utc).isoformat(timespec="seconds")
    report["wall_s"] = round(time.time() - started, 3)
