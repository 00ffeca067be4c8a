"""Reload a Gemma 3 checkpoint in transformers and run one forward pass on an image prompt.

Proves a checkpoint is usable outside vLLM: transformers applies the compressed-tensors config on load
(in the quantize environment, whose compressed-tensors decompresses FP8-dynamic) and the exact failure
this guards against, a vision tower quantized on reload, shows up as NaN image logits (docs/notes.md: FP8-dynamic with llm-compressor).

    python -m pipeline.testing.hf_reload CHECKPOINT_DIR   -> one JSON line on stdout
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def gradient_image(size_px: int = 320):
    """A deterministic image with structure (flat colours make every patch alike)."""
    from PIL import Image

    image = Image.new("RGB", (size_px, size_px))
    image.putdata([((x * 255) // size_px, (y * 255) // size_px, ((x + y) * 127) // size_px)
                   for y in range(size_px) for x in range(size_px)])
    return image


def reload_and_score(checkpoint: str) -> dict[str, Any]:
    import torch
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration

    model = Gemma3ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=prompt, images=gradient_image(), return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits.float()
    quantized = sorted(name for name, module in model.named_modules()
                       if getattr(module, "quantization_scheme", None) is not None)
    return {
        "image_tokens": int((inputs["input_ids"] == model.config.image_token_id).sum()),
        "logits_shape": list(logits.shape),
        "finite": bool(torch.isfinite(logits).all()),
        "last_logits": [round(v, 6) for v in logits[0, -1].tolist()],
        "quantized_modules": quantized,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint")
    args = parser.parse_args(argv)
    sys.stdout.write(json.dumps(reload_and_score(args.checkpoint)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
