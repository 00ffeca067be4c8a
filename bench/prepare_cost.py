"""CPU seconds per image of every CPU stage of the batch job, W1 and W2, and the CPU cores per GPU they need.

    python -m bench.prepare_cost [--model DIR] [--images 24] [--repeats 5] [--rate 27.2] [--json PATH]

Every stage is the pipeline's own code, called in this process on the workload's images: Ray Data's
parquet read (pyarrow), a fetch of a local file by path (`pipeline.io.fetch.Fetcher`), the decode (with and
without JPEG draft mode) and resize that `pipeline.io.images.prepare_image` does, the whole `PrepareRecords`
UDF, the processor's preprocess (`RequestBuilder`), ray.data.llm's prepare-multimodal, chat-template and
tokenize UDFs as `pipeline.batch.caption` builds them, and the engine actor's front-end work per request: vLLM's
`InputProcessor.process_inputs` (the Gemma 3 multimodal processor as our plugin configures it) and the
msgpack encoding of the request for the engine core.

Time is CPU time (`time.process_time`: every thread of this process, nothing of other processes), so a
busy machine does not inflate it; each stage runs `--repeats` times over all images after a warm-up and
the median is reported. W1: distinct 896 x 896 JPEGs (bench.common.w1_image_bytes); W2: camera-sized
4032 x 3024 q90 JPEGs (bench.common.camera_image_bytes).

Cores per GPU = CPU s per image x images/s per GPU (`--rate`, default the H200's measured W1 rate)
x `--headroom` (Ray Data's own serialisation between stages, scheduling and GC are not in the table).
The preparation stages run in actor pools and scale with CPUs; the engine front-end is one process per
replica, so when its cost x the rate exceeds one core no CPU count helps.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

# docs/performance.md: the pipeline's whole-run W1 rate on one H200 (FP8, kv-fp8, 512 sequences).
H200_W1_IMAGES_PER_S = 27.2
DEFAULT_HEADROOM = 1.5
DEFAULT_MODEL = os.environ.get("TINY_GEMMA3_DIR", "/work/tiny-gemma3")


@dataclass(frozen=True)
class Stage:
    name: str
    where: str  # "prepare" (CPU actor pools), "frontend" (the engine actor's process), "part" (inside another row)
    note: str = ""


# Rows of the table, in pipeline order. "part" rows are components of PrepareRecords, shown for where its
# time goes; "fetch" is added only for records that name their image by path or URI.
STAGES = (
    Stage("read parquet", "prepare", "pyarrow read of the input file (Ray Data read task)"),
    Stage("fetch local file", "fetch", "Fetcher.fetch of a path (records with image_uri instead of bytes)"),
    Stage("decode, full size", "part", "reference: the same decode without draft mode"),
    Stage("decode, draft mode", "part", "header checks + JPEG draft + load, as prepare_image does"),
    Stage("resize to 896", "part", "resize of the drafted image with the processor's filter"),
    Stage("prepare_image", "part", "decode (draft) + EXIF orient + RGB + resize"),
    Stage("PrepareRecords UDF", "prepare", "the whole stage: validate, prepare_image, pixels out, thumbnails"),
    Stage("RequestBuilder", "prepare", "processor preprocess: pixels -> chat messages"),
    Stage("prepare multimodal", "prepare", "ray.data.llm stage (vLLM's chat message parser)"),
    Stage("chat template", "prepare", "ray.data.llm stage (HF processor's apply_chat_template)"),
    Stage("tokenize", "prepare", "ray.data.llm stage with our rendered-prompt UDF"),
    Stage("engine front-end", "frontend", "vLLM InputProcessor.process_inputs + msgpack encode of the request"),
)


def cpu_seconds_per_item(call: Callable[[Any], Any], items: Sequence[Any], repeats: int) -> float:
    """Median over `repeats` passes of this process's CPU seconds per item of `call(item)` (after one
    untimed call: imports, first allocations, caches of the callee's own)."""
    call(items[0])
    samples = []
    for _ in range(repeats):
        started = time.process_time()
        for item in items:
            call(item)
        samples.append((time.process_time() - started) / len(items))
    return statistics.median(samples)


def cores_per_gpu(cpu_s: dict[str, float], images_per_s: float, headroom: float) -> dict[str, Any]:
    """What one GPU's engine at `images_per_s` needs of the CPU, from a workload's per-stage costs."""
    by_stage = {s.name: s.where for s in STAGES}
    prepare = sum(v for k, v in cpu_s.items() if by_stage.get(k) == "prepare")
    frontend = sum(v for k, v in cpu_s.items() if by_stage.get(k) == "frontend")
    fetch = cpu_s.get("fetch local file", 0.0)
    frontend_load = frontend * images_per_s
    return {
        "images_per_s_per_gpu": images_per_s, "headroom": headroom,
        "prepare_cpu_s_per_image": prepare,
        "prepare_cores_per_gpu": prepare * images_per_s * headroom,
        "prepare_cores_per_gpu_with_fetch": (prepare + fetch) * images_per_s * headroom,
        "frontend_cpu_s_per_image": frontend,
        # One process per replica: its share of one core at this rate; >= 1 is a ceiling on the replica.
        "frontend_core_load": frontend_load,
        "frontend_ceiling_images_per_s": (1.0 / frontend) if frontend else None,
        "frontend_is_ceiling": frontend_load >= 1.0,
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _run_async_udf(udf: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One ray.data.llm stage UDF over rows, in row order (its `udf` coroutine, without Ray around it)."""
    idx = udf.IDX_IN_BATCH_COLUMN
    batch = [{**row, idx: i} for i, row in enumerate(rows)]

    async def collect():
        return [out async for out in udf.udf(batch)]

    outputs = sorted(asyncio.run(collect()), key=lambda r: r[idx])
    return [{**row, **{k: v for k, v in out.items() if k != idx}} for row, out in zip(rows, outputs)]


class Workload:
    """One workload's images as the job sees them: parquet bytes, files, prepared rows."""

    def __init__(self, name: str, blobs: list[bytes], prompt: str, workdir: Path):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.name, self.blobs = name, blobs
        self.table = pa.table({"id": [f"{name}-{i}" for i in range(len(blobs))],
                               "image": pa.array(blobs, type=pa.binary()), "prompt": [prompt] * len(blobs)})
        self.parquet = workdir / f"{name}.parquet"
        pq.write_table(self.table, self.parquet, row_group_size=64)
        self.files = []
        for i, blob in enumerate(blobs):
            path = workdir / f"{name}-{i}.jpg"
            path.write_bytes(blob)
            self.files.append(str(path))


def measure(workload: Workload, config, processor_stages: dict[str, Any], vllm_config: Any,
            repeats: int) -> dict[str, float]:
    """CPU seconds per image of every stage in STAGES, for one workload."""
    import pyarrow.parquet as pq
    from PIL import Image

    from pipeline.io import images as I
    from pipeline.io import records as R
    from pipeline.stages.engine_rows import RequestBuilder
    from pipeline.io.fetch import Fetcher
    from pipeline.stages.prepare import PrepareRecords

    target = I.ImageTarget(896)
    limits = config.images
    n = len(workload.blobs)
    result: dict[str, float] = {}
    result["read parquet"] = cpu_seconds_per_item(lambda p: pq.read_table(p), [workload.parquet] * 2, repeats) / n
    fetcher = Fetcher(config.fetch, config.storage, max_bytes=limits.max_bytes)
    result["fetch local file"] = cpu_seconds_per_item(fetcher.fetch, workload.files, repeats)

    def decode(data: bytes, draft: bool) -> Image.Image:
        image = I._open(data, limits)
        if draft and image.format in ("JPEG", "MPO"):
            image.draft("RGB", (target.size_px, target.size_px))
        image.load()
        return image

    result["decode, full size"] = cpu_seconds_per_item(lambda d: decode(d, False), workload.blobs, repeats)
    result["decode, draft mode"] = cpu_seconds_per_item(lambda d: decode(d, True), workload.blobs, repeats)
    drafted = [decode(d, True).convert("RGB") for d in workload.blobs]
    result["resize to 896"] = cpu_seconds_per_item(
        lambda im: im.resize((target.size_px, target.size_px), resample=target.resample), drafted, repeats)
    result["prepare_image"] = cpu_seconds_per_item(lambda d: I.prepare_image(d, limits, target),
                                                   workload.blobs, repeats)

    # The whole UDF on batches of batch.prepare_batch_size rows, as Ray Data hands them over.
    prepare = PrepareRecords(config, target, frozenset())
    size = config.batch.prepare_batch_size
    batches = [workload.table.slice(i, size) for i in range(0, n, size)]
    result["PrepareRecords UDF"] = cpu_seconds_per_item(prepare, batches, repeats) * len(batches) / n
    prepared = pa_concat([prepare(b) for b in batches]).to_pylist()
    assert all(row[R.PIXELS] for row in prepared), "a workload image failed to prepare"

    schema = R.output_schema(workload.table.schema, config.batch.passthrough_columns)
    builder = RequestBuilder(config, target.size_px, schema)
    result["RequestBuilder"] = cpu_seconds_per_item(builder, prepared, repeats)
    requests = [builder(row) for row in prepared]

    rows = requests
    for label, stage_name in (("prepare multimodal", "PrepareMultimodalStage"), ("chat template", "ChatTemplateStage"),
                              ("tokenize", "TokenizeStage")):
        stage = processor_stages[stage_name]
        udf = stage.fn(data_column="__data", expected_input_keys=list(stage.get_required_input_keys()),
                       **stage.fn_constructor_kwargs)
        result[label] = cpu_seconds_per_item(lambda batch: _run_async_udf(udf, batch), [rows], repeats) / n
        rows = _run_async_udf(udf, rows)

    result["engine front-end"] = frontend_cost(vllm_config, rows, config, repeats)
    return result


def pa_concat(tables):
    import pyarrow as pa

    return pa.concat_tables(tables)


def frontend_cost(vllm_config: Any, rows: list[dict[str, Any]], config, repeats: int) -> float:
    """vLLM's per-request work in the engine actor's process, as the engine stage submits a row: token
    ids + the image. Every pass uses images no earlier pass used: vLLM caches processed images by a hash
    of their pixels, and the batch job's images are distinct."""
    from PIL import Image
    from vllm import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.serial_utils import MsgpackEncoder

    processor = InputProcessor(vllm_config)
    encoder = MsgpackEncoder()
    params = SamplingParams(**config.sampling.to_vllm())
    counter = iter(range(10**9))

    def variant(image: Image.Image, k: int) -> Image.Image:
        # Distinct pixels, same content statistics: a cyclic shift of the image's rows.
        data = image.tobytes()
        shift = (k * 3 * image.width * 7) % len(data)
        return Image.frombytes("RGB", image.size, data[shift:] + data[:shift])

    passes = [[(row["tokenized_prompt"], variant(row["multimodal_data"]["image"][0], k)) for row in rows]
              for k in range(repeats + 1)]
    samples = []
    for images in passes:
        started = time.process_time()
        for ids, image in images:
            request = processor.process_inputs(f"r{next(counter)}", {"prompt_token_ids": ids,
                                                                     "multi_modal_data": {"image": image}},
                                               params, ("generate",))
            encoder.encode(request)
        samples.append((time.process_time() - started) / len(images))
    return statistics.median(samples[1:])  # the first pass warms up


def format_table(results: dict[str, dict[str, float]], derived: dict[str, dict[str, Any]], cpu: str) -> str:
    names = list(results)
    lines = [f"CPU: {cpu}; CPU ms per image (median of repeats, process CPU time)", "",
             "| stage | where | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    where = {"prepare": "CPU pools", "frontend": "engine actor", "part": "(in PrepareRecords)",
             "fetch": "CPU pools, URIs only"}
    for stage in STAGES:
        cells = " | ".join(f"{results[n][stage.name] * 1e3:.2f}" for n in names)
        lines.append(f"| {stage.name} | {where[stage.where]} | {cells} |")
    rows = (("preparation, CPU ms per image", lambda d: f"{d['prepare_cpu_s_per_image'] * 1e3:.1f}"),
            ("preparation cores per GPU", lambda d: f"{d['prepare_cores_per_gpu']:.1f}"),
            ("... with a fetch by path", lambda d: f"{d['prepare_cores_per_gpu_with_fetch']:.1f}"),
            ("engine front-end, share of one core", lambda d: f"{d['frontend_core_load']:.2f}"),
            ("engine front-end ceiling, images/s", lambda d: f"{d['frontend_ceiling_images_per_s']:.0f}"))
    first = derived[names[0]]
    lines += ["", f"at {first['images_per_s_per_gpu']:g} images/s per GPU, x{first['headroom']:g} headroom:", ""]
    lines += ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {label} | " + " | ".join(fmt(derived[n]) for n in names) + " |" for label, fmt in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint dir (its tokenizer and processor)")
    parser.add_argument("--images", type=int, default=24, help="distinct images per workload")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rate", type=float, default=H200_W1_IMAGES_PER_S, help="engine images/s per GPU")
    parser.add_argument("--headroom", type=float, default=DEFAULT_HEADROOM)
    parser.add_argument("--workloads", nargs="+", default=["W1", "W2"], choices=["W1", "W2"])
    parser.add_argument("--json", default="prepare_cost.json", help="where to write the results")
    args = parser.parse_args(argv)

    import ray
    from ray.data.llm import build_processor
    from vllm.engine.arg_utils import EngineArgs
    from vllm.plugins import load_general_plugins

    from bench.common import W1_PROMPT, camera_image_bytes, w1_image_bytes
    from pipeline.batch.caption import _stage_overrides, processor_config
    from pipeline.config import PipelineConfig
    from pipeline.engine.args import engine_kwargs

    workdir = Path(tempfile.mkdtemp(prefix="prepare-cost-"))
    config = PipelineConfig.load("configs/tiny-cpu.yaml", [
        f"model.source={args.model}", "fetch.allow_local_paths=true", f"fetch.local_path_prefixes=[{workdir}]",
        # No gallery: over a long run a worker thumbnails ~k ln(N/k) of its N rows, a vanishing share,
        # while a fresh sampler would thumbnail every one of these few rows.
        "batch.prepare_batch_size=16", "report.gallery_size=0"], environ={})
    # The processor's CPU stages exactly as the batch job builds them (our tokenize UDF swapped in);
    # building it starts a local Ray, which nothing here uses afterwards.
    stages = build_processor(processor_config(config), builder_kwargs={
        "override_stage_config_fn": _stage_overrides(config, False, None)}).stages
    load_general_plugins()  # our vLLM plugin: the Gemma 3 variant engine_kwargs names
    vllm_config = EngineArgs(model=config.model.source, **engine_kwargs(config)).create_engine_config()

    makers = {"W1": w1_image_bytes, "W2": camera_image_bytes}
    results, derived = {}, {}
    for name in args.workloads:
        workload = Workload(name, [makers[name](i) for i in range(args.images)], W1_PROMPT, workdir)
        results[name] = measure(workload, config, stages, vllm_config, args.repeats)
        derived[name] = cores_per_gpu(results[name], args.rate, args.headroom)
        derived[name]["mean_image_bytes"] = statistics.mean(len(b) for b in workload.blobs)
    ray.shutdown()
    cpu = cpu_model()
    print(format_table(results, derived, cpu))
    out = {"cpu": cpu, "logical_cpus": os.cpu_count(), "model": args.model, "images": args.images,
           "repeats": args.repeats, "cpu_s_per_image": results, "per_gpu": derived,
           "stages": {s.name: {"where": s.where, "note": s.note} for s in STAGES}}
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"\nwrote {args.json}")
    return out


if __name__ == "__main__":
    main()
