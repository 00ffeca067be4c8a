"""Shared pieces of the GPU benchmark: the workloads, a GPU utilisation sampler, result lines."""
from __future__ import annotations

import functools
import io
import json
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Workload W1 (docs/notes.md: GPU baseline): a distinct 896 x 896 image + a ~24-token prompt, 128 generated tokens.
W1_PROMPT = ("Describe this image in detail: the main objects, their colours and positions, the setting, "
             "and anything unusual.")
TEXT_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
GENERATED_TOKENS = 128
RESULT_PREFIX = "RESULT "

# The engine settings of every benchmark run, batch and online alike: one PipelineConfig gives both their
# vLLM engine arguments (`pipeline.engine.args.engine_kwargs`), so a layout is compared on the same engine.
# (vLLM's compile cache still did not carry over from a batch start to an online one: on 2026-11-27 the
# printed engine configs matched but the cache keys differed, so every start compiled, ~70 s.)
BENCH_SETTINGS = [
    "engine.device=gpu", "engine.tensor_parallel_size=1", "engine.max_model_len=8192",
    "engine.max_num_seqs=256", "engine.gpu_memory_utilization=0.9", "engine.enforce_eager=false",
    f"sampling.max_tokens={GENERATED_TOKENS}", "sampling.ignore_eos=true", "sampling.temperature=0",
    "model.quantization=any", "batch.engine_replicas=1", "batch.engine_batch_size=64",
    "batch.max_concurrent_batches=8", "batch.prepare_replicas=[2,6]", "batch.prepare_batch_size=32",
    "runtime.local_num_cpus=16",
]


def bench_overrides(checkpoint: str, overrides: list[str]) -> list[str]:
    """Config overrides of one run: the benchmark's settings, the checkpoint, then the run's own."""
    return BENCH_SETTINGS + [f"model.source={checkpoint}"] + list(overrides)


def w1_image_bytes(index: int, side: int = 896) -> bytes:
    """A distinct synthetic photo-like JPEG: gradients, shapes and texture (not flat colour, not noise)."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    colours = rng.random((3, 3)).astype(np.float32)
    base = np.stack([colours[c, 0] * x + colours[c, 1] * y + colours[c, 2] * x * y for c in range(3)], axis=-1)
    texture = rng.normal(0, 0.04, (side // 8, side // 8, 3)).repeat(8, 0).repeat(8, 1)
    image = Image.fromarray((np.clip(base + texture, 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(4, 12))):
        x0, y0 = rng.integers(0, side - 64, 2)
        w, h = rng.integers(32, side // 2, 2)
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x0 + w, y0 + h), fill=fill)
    image = image.filter(ImageFilter.GaussianBlur(1.2))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


# Workload W2: camera-sized photos, 4032 x 3024 JPEGs at quality 90 (~1.5-2 MB), the size a phone writes.
CAMERA_SIZE = (4032, 3024)


@functools.lru_cache(maxsize=2)
def _camera_base(seed: int) -> np.ndarray:
    """A smooth photo-like 12 MP frame with fine grain (a few seconds to make; shared by its variants)."""
    width, height = CAMERA_SIZE
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    x /= width
    y /= height
    colours = rng.random((3, 3)).astype(np.float32)
    base = np.stack([colours[c, 0] * x + colours[c, 1] * y + colours[c, 2] * x * y for c in range(3)], axis=-1)
    grain = rng.normal(0, 0.025, (height // 2, width // 2, 3)).astype(np.float32).repeat(2, 0).repeat(2, 1)
    return (np.clip(base + grain, 0, 1) * 255).astype(np.uint8)


def camera_image_bytes(index: int) -> bytes:
    """A distinct camera-sized JPEG: one of a few 12 MP base frames with shapes of its own drawn on it.

    Distinct pixels matter: vLLM caches processed images by a hash of their pixels, so a repeated image
    would skip the resize this workload is about."""
    from PIL import Image, ImageDraw

    width, height = CAMERA_SIZE
    image = Image.fromarray(_camera_base(index // 128))
    draw = ImageDraw.Draw(image)
    rng = np.random.default_rng(10_000_000 + index)
    for _ in range(int(rng.integers(4, 10))):
        x0, y0 = int(rng.integers(0, width - 256)), int(rng.integers(0, height - 256))
        w, h = (int(v) for v in rng.integers(128, width // 3, 2))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x0 + w, y0 + h), fill=fill)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_w1_parquet(path: Path, count: int, start: int = 0, workers: int = 8) -> Path:
    """`count` W1 records (id, image bytes, prompt) as one parquet file."""
    from concurrent.futures import ProcessPoolExecutor

    import pyarrow as pa
    import pyarrow.parquet as pq

    with ProcessPoolExecutor(workers) as pool:
        blobs = list(pool.map(w1_image_bytes, range(start, start + count), chunksize=16))
    table = pa.table({"id": [f"w1-{i:06d}" for i in range(start, start + count)],
                      "image": pa.array(blobs, type=pa.binary()),
                      "prompt": [W1_PROMPT] * count})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=64)
    return path


def visible_nvml_indices(count: int, visible: str | None) -> list[int]:
    """NVML indices of the GPUs this process may use. NVML sees every GPU of the machine, whatever
    CUDA_VISIBLE_DEVICES says; the benchmark's lanes set it with CUDA_DEVICE_ORDER=PCI_BUS_ID, under
    which CUDA's index i is NVML's index i. UUIDs or an unset variable: every GPU."""
    if visible is None or not visible.strip():
        return list(range(count))
    try:
        indices = [int(part) for part in visible.split(",") if part.strip()]
    except ValueError:
        return list(range(count))
    return [i for i in indices if 0 <= i < count]


@dataclass
class GpuSampler:
    """Samples SM utilisation of every GPU this process may use (CUDA_VISIBLE_DEVICES) every `period_s`
    in a thread (NVML), between start() and stop(). The series is the mean over those GPUs, so one busy
    GPU of four reads 25%."""

    period_s: float = 0.2
    samples: list[tuple[float, list[int]]] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread = None

    def start(self) -> "GpuSampler":
        try:
            import pynvml

            pynvml.nvmlInit()
            indices = visible_nvml_indices(pynvml.nvmlDeviceGetCount(), os.environ.get("CUDA_VISIBLE_DEVICES"))
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
        except Exception:  # no NVML (CPU machine): the benchmark still runs, without utilisation
            return self

        def loop():
            while not self._stop.is_set():
                utils = [int(pynvml.nvmlDeviceGetUtilizationRates(h).gpu) for h in handles]
                self.samples.append((time.perf_counter(), utils))
                time.sleep(self.period_s)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        if self._thread:
            self._thread.join()
        values = [statistics.mean(u) for _, u in self.samples]
        if not values:
            return {"gpu_util_mean": None}
        per_gpu = [round(statistics.mean(column), 1) for column in zip(*(u for _, u in self.samples))]
        return {"gpu_util_mean": round(statistics.mean(values), 1),
                "gpu_util_p50": statistics.median(values), "gpu_util_per_gpu": per_gpu,
                "gpu_util_series": [round(v, 1) for v in values[:: max(1, len(values) // 120)]]}


def card_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:
        return "unknown"


def stop_process_group(process, grace_s: float) -> None:
    """SIGTERM to a server or job started in its own session, up to `grace_s` for it to exit (our jobs
    shut their embedded Ray down on it), then SIGKILL to its whole process group."""
    import signal
    import subprocess

    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def emit(result: dict) -> None:
    """One result as a single line the orchestrator picks out of the subprocess output."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)
