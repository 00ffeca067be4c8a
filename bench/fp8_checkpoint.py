"""Write an FP8-dynamic compressed-tensors checkpoint from a bf16 one, shard by shard, for benchmarks.

The benchmark machine has no llm-compressor (it cannot share an environment with vLLM, docs/notes.md: Versions), so
this writes the same format jobs.quantize produces: every text Linear weight as float8_e4m3fn [out, in]
with a per-output-channel bf16 `weight_scale` [out, 1] (symmetric, round-to-nearest, absmax / 448),
dynamic per-token activations; lm_head, vision tower and projector untouched. Only timing depends on it.

    python -m bench.fp8_checkpoint SRC DST [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IGNORE = ["re:.*lm_head", "re:vision_tower.*", "re:multi_modal_projector.*"]


def quantization_config() -> dict:
    scheme = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "block_structure": None,
              "actorder": None}
    return {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"], "format": "float-quantized", "output_activations": None,
            "weights": {**scheme, "strategy": "channel", "dynamic": False, "observer": "minmax"},
            "input_activations": {**scheme, "strategy": "token", "dynamic": True, "observer": None},
        }},
        "ignore": IGNORE, "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {},
    }


def is_text_linear(name: str) -> bool:
    return name.startswith("language_model.") and name.endswith(".weight") and any(
        f".{linear}." in name for linear in LINEARS)


def convert(src: str | Path, dst: str | Path, device: str = "cpu") -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    started = time.time()
    src, dst = Path(src), Path(dst)
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for item in src.iterdir():
        if not item.name.endswith(".safetensors") and item.name != "model.safetensors.index.json":
            shutil.copy2(item, dst / item.name)
    weight_map, quantized, total_bytes = {}, 0, 0
    fp8_max = torch.finfo(torch.float8_e4m3fn).max
    for shard in sorted(src.glob("*.safetensors")):
        out = {}
        for name, tensor in load_file(shard).items():
            if is_text_linear(name):
                weight = tensor.to(device=device, dtype=torch.float32)
                scale = (weight.abs().amax(dim=1, keepdim=True) / fp8_max).clamp(min=1e-12)
                out[name] = (weight / scale).clamp(-fp8_max, fp8_max).to(torch.float8_e4m3fn).cpu()
                out[name[: -len("weight")] + "weight_scale"] = scale.to(torch.bfloat16).cpu()
                quantized += 1
            else:
                out[name] = tensor
        save_file(out, dst / shard.name, metadata={"format": "pt"})
        total_bytes += (dst / shard.name).stat().st_size
        weight_map.update({name: shard.name for name in out})
    if (src / "model.safetensors.index.json").exists():
        (dst / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=2))
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = quantization_config()
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return {"quantized_linears": quantized, "bytes": total_bytes, "seconds": round(time.time() - started, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    print(json.dumps(convert(args.src, args.dst, args.device)))


if __name__ == "__main__":
    main()
