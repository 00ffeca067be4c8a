"""The physical floor of workload W1 on one GPU: FLOPs and bytes per image for Gemma-3-12b-it.

    python -m bench.floor [--prompt-tokens 329] [--bf16-tflops 792] [--fp8-tflops 1432] [--tb-s 3.02]

Counts what must happen for one image (896 px, 4096 patches, a ~329-token prompt, 128 generated tokens,
256 sequences decoding together) and divides by the card's measured ceilings. Two floors are given:
`serial` (compute-bound and memory-bound work one after the other) and `overlapped` (the larger of the
two sums, as if the scheduler hid one behind the other perfectly). No run can beat the overlapped one.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

# Gemma-3-12b-it shapes (pipeline.testing.tiny_gemma3.GEMMA3_12B).
TEXT_LAYERS, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 48, 3840, 15360, 16, 8, 256
VISION_LAYERS, VISION_HIDDEN, VISION_MLP, PATCHES, PATCH_PIXELS = 27, 1152, 4304, 4096, 14 * 14 * 3
IMAGE_TOKENS = 256


@dataclass
class Workload:
    prompt_tokens: int = 329      # measured mean with the benchmark's tokenizer (256 image tokens + text)
    generated_tokens: int = 128
    concurrent_sequences: int = 256
    kv_bytes_per_value: int = 2   # bf16 KV cache


def text_linear_params() -> int:
    attention = HIDDEN * HEADS * HEAD_DIM * 2 + HIDDEN * KV_HEADS * HEAD_DIM * 2
    mlp = 3 * HIDDEN * INTERMEDIATE
    return TEXT_LAYERS * (attention + mlp)


def per_image(work: Workload) -> dict[str, float]:
    """FLOPs and bytes for one W1 image, by part."""
    vision_linear = 2 * PATCHES * VISION_LAYERS * (4 * VISION_HIDDEN**2 + 2 * VISION_HIDDEN * VISION_MLP)
    vision_attention = VISION_LAYERS * 4 * PATCHES**2 * VISION_HIDDEN
    vision = vision_linear + vision_attention + 2 * PATCHES * PATCH_PIXELS * VISION_HIDDEN
    projector = 2 * IMAGE_TOKENS * VISION_HIDDEN * HIDDEN
    params = text_linear_params()
    prefill = 2 * params * work.prompt_tokens
    decode = 2 * params * work.generated_tokens
    kv_per_token = TEXT_LAYERS * 2 * KV_HEADS * HEAD_DIM * work.kv_bytes_per_value
    mean_context = work.prompt_tokens + work.generated_tokens / 2
    # Every decode step reads each sequence's whole KV cache (the prompt fits in the 1024-token sliding
    # window, so sliding layers read it all too).
    kv_read = work.generated_tokens * mean_context * kv_per_token
    return {"vision_flops": vision + projector, "prefill_flops": prefill, "decode_flops": decode,
            "decode_kv_bytes": kv_read, "text_params": params, "kv_bytes_per_token": kv_per_token}


def floor(work: Workload, bf16_tflops: float, fp8_tflops: float, tb_s: float, fp8: bool) -> dict[str, float]:
    parts = per_image(work)
    linear_tflops = fp8_tflops if fp8 else bf16_tflops
    weight_bytes = parts["text_params"] * (1 if fp8 else 2)
    vision_ms = parts["vision_flops"] / (bf16_tflops * 1e12) * 1e3   # the vision tower stays bf16
    prefill_ms = parts["prefill_flops"] / (linear_tflops * 1e12) * 1e3
    decode_compute_ms = parts["decode_flops"] / (linear_tflops * 1e12) * 1e3
    # Decode weight reads are shared by the sequences decoding together.
    decode_weights_ms = work.generated_tokens * weight_bytes / work.concurrent_sequences / (tb_s * 1e12) * 1e3
    decode_kv_ms = parts["decode_kv_bytes"] / (tb_s * 1e12) * 1e3
    compute_ms = vision_ms + prefill_ms + decode_compute_ms
    memory_ms = decode_weights_ms + decode_kv_ms
    serial_ms = vision_ms + prefill_ms + max(decode_compute_ms, decode_weights_ms) + decode_kv_ms
    overlapped_ms = max(compute_ms, memory_ms)
    return {"vision_ms": vision_ms, "prefill_ms": prefill_ms, "decode_compute_ms": decode_compute_ms,
            "decode_weights_ms": decode_weights_ms, "decode_kv_ms": decode_kv_ms,
            "serial_images_per_s": 1e3 / serial_ms, "overlapped_images_per_s": 1e3 / overlapped_ms,
            "flops_per_image": parts["vision_flops"] + parts["prefill_flops"] + parts["decode_flops"],
            "bytes_per_image": parts["decode_kv_bytes"] + work.generated_tokens * weight_bytes / work.concurrent_sequences}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=329)
    parser.add_argument("--bf16-tflops", type=float, default=792.1)
    parser.add_argument("--fp8-tflops", type=float, default=1431.9)
    parser.add_argument("--tb-s", type=float, default=3.02)
    args = parser.parse_args(argv)
    work = Workload(prompt_tokens=args.prompt_tokens)
    result = {name: {k: round(v, 2) for k, v in floor(work, args.bf16_tflops, args.fp8_tflops, args.tb_s, fp8).items()}
              for name, fp8 in (("fp8", True), ("bf16", False))}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
