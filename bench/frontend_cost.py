"""Time the per-image work vLLM's front-end does for Gemma 3: the stock HF processor call vs our uint8 variant.

    python -m bench.frontend_cost MODEL_DIR [--images 64]

Both run on the same 896 x 896 images (as our CPU workers deliver them) in one process, one thread of
Python, as in vLLM's front-end. Prints milliseconds per image for each path and the ratio.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from PIL import Image


def images(count: int, side: int = 896) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    return [Image.fromarray(np.roll(base, i * 7, axis=1)) for i in range(count)]


def time_per_image(call, batch: list[Image.Image], repeats: int = 3) -> float:
    call(batch[:1])  # warm-up: lazy imports, first allocations
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        for image in batch:
            call([image])
        samples.append((time.perf_counter() - started) / len(batch) * 1000)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--images", type=int, default=64)
    args = parser.parse_args(argv)
    from transformers import AutoProcessor

    from pipeline.engine.gemma3 import Uint8ImageProcessor

    processor = AutoProcessor.from_pretrained(args.model)
    stock_ip = processor.image_processor
    fast_ip = Uint8ImageProcessor(stock_ip)
    batch = images(args.images)
    prompt = "<start_of_image> Describe this image."
    result = {
        "image_processor_class": type(stock_ip).__name__,
        "stock_image_processor_ms": time_per_image(lambda b: stock_ip(b, return_tensors="pt"), batch),
        "uint8_image_processor_ms": time_per_image(lambda b: fast_ip(b), batch),
        "stock_processor_with_text_ms": time_per_image(
            lambda b: processor(text=[prompt], images=[b], return_tensors="pt"), batch),
    }
    result["image_processor_speedup"] = round(result["stock_image_processor_ms"] / result["uint8_image_processor_ms"], 2)
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()}))
    return result


if __name__ == "__main__":
    main()
