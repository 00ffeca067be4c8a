"""Host time per engine step spent rebuilding image ranges, vLLM's own function vs ours (pipeline/engine/patches.py).

    python -m bench.mm_range_cost [--requests 250 490] [--repeat 20]

Runs vLLM's own `compute_mm_prefix_ranges` loop shape, one Gemma 3 image per request (a 262-token
placeholder, 256 of it image tokens), over as many requests as decode together. It runs on whatever
CPU it is given, no GPU, and prints milliseconds per step for both functions and their ratio.
"""
from __future__ import annotations

import argparse
import time


def per_step_ms(placeholders, extract, repeat: int) -> float:
    """Best-of-`repeat` time of one step's pass over every request's image range."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for placeholder in placeholders:
            for start, end in extract(placeholder):
                if end - start + 1 > 1024:  # vLLM's sliding-window check, kept so the loop does the same work
                    continue
        best = min(best, time.perf_counter() - started)
    return best * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, nargs="+", default=[250, 490])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args(argv)

    import torch
    from vllm.multimodal.inputs import PlaceholderRange

    from pipeline.engine.patches import cache_embeds_ranges

    cache_embeds_ranges()
    patched = PlaceholderRange.extract_embeds_range
    original = patched._pipeline_original
    mask = torch.zeros(262, dtype=torch.bool)
    mask[3:259] = True
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for n in args.requests:
        placeholders = [PlaceholderRange(offset=12 + i, length=262, is_embed=mask.clone()) for i in range(n)]
        vllm_ms = per_step_ms(placeholders, original, args.repeat)
        ours_ms = per_step_ms(placeholders, patched, args.repeat)
        print(f"{n} requests: vLLM {vllm_ms:.2f} ms per step, cached {ours_ms:.3f} ms per step, "
              f"{vllm_ms / ours_ms:.0f}x less host time")


if __name__ == "__main__":
    main()
