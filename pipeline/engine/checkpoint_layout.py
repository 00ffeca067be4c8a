"""A Gemma 3 checkpoint's tensor names: which SigLIP layout it uses, whether vLLM can load them, and a
rewrite into the layout vLLM loads. Pure name logic plus safetensors headers: no torch, no vLLM.

Gemma 3 checkpoints exist in two layouts that differ only in where the SigLIP vision tower sits:
- Google's (the published checkpoints): `vision_tower.vision_model.<...>` (with a leading `model.`
  when saved by transformers 4.52-4.x);
- transformers 5's `save_pretrained`, i.e. any fine-tune saved today: `vision_tower.<...>`.
vLLM's Gemma 3 (0.26-0.29) maps the `model.` prefixes of newer checkpoints but looks SigLIP up under
Google's names only, so the second layout dies at engine start ("no module or parameter named
'vision_tower.embeddings'"), after the job has taken its GPUs. `check_tensor_names` finds that, and a
tensor missing from a layer, on the driver from the checkpoint's headers; `to_google_layout` rewrites a
checkpoint directory (jobs.quantize does, so its output loads in stock vLLM); our Gemma 3 variant
(`pipeline.engine.gemma3`) maps both layouts when it loads.
"""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any, Iterable, Optional

INDEX_NAME = "model.safetensors.index.json"

# transformers 5's SigLIP names: `vision_tower.` not followed by `vision_model.` (optionally under `model.`).
_TRANSFORMERS_SIGLIP = re.compile(r"^((?:model\.)?vision_tower\.)(?!vision_model\.)")

# vLLM's Gemma3ForConditionalGeneration.hf_to_vllm_mapper (prefixes of checkpoints saved after
# transformers 4.52), mirrored so the driver needs no vLLM import; tests/unit/engine/test_checkpoint_layout.py
# checks the mirror against vLLM's own mapper.
VLLM_GEMMA3_PREFIXES = {
    "model.language_model.": "language_model.model.",
    "model.vision_tower.": "vision_tower.",
    "model.multi_modal_projector.": "multi_modal_projector.",
    "lm_head.": "language_model.lm_head.",
}
# Where every tensor vLLM's Gemma 3 loads lives, once mapped.
LOADED_ROOTS = ("language_model.", "vision_tower.vision_model.", "multi_modal_projector.")
REQUIRED = (
    "language_model.model.embed_tokens.weight",
    "language_model.model.norm.weight",
    "vision_tower.vision_model.embeddings.patch_embedding.weight",
    "vision_tower.vision_model.embeddings.position_embedding.weight",
    "vision_tower.vision_model.post_layernorm.weight",
    "multi_modal_projector.mm_input_projection_weight",
    "multi_modal_projector.mm_soft_emb_norm.weight",
)
# Layer stacks: (label, prefix of layer i, config section holding the layer count, tensors every layer has).
LAYER_STACKS = (
    ("text", "language_model.model.layers.", "text_config",
     ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
      "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
      "post_attention_layernorm.weight")),
    ("vision", "vision_tower.vision_model.encoder.layers.", "vision_config",
     ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
      "self_attn.out_proj.weight", "mlp.fc1.weight", "mlp.fc2.weight", "layer_norm1.weight", "layer_norm2.weight")),
)


def to_google_name(name: str) -> str:
    """The tensor's name in Google's layout (unchanged when it already is, or is not SigLIP's)."""
    return _TRANSFORMERS_SIGLIP.sub(r"\1vision_model.", name)


def has_transformers_siglip(names: Iterable[str]) -> bool:
    return any(_TRANSFORMERS_SIGLIP.match(name) for name in names)


def vllm_loaded_name(name: str, maps_transformers_siglip: bool) -> str:
    """The name vLLM's Gemma 3 looks the tensor up under; with `maps_transformers_siglip` (our variant),
    transformers 5's SigLIP names are first moved to Google's."""
    if maps_transformers_siglip:
        name = to_google_name(name)
    for old, new in VLLM_GEMMA3_PREFIXES.items():
        if name.startswith(old):
            return new + name[len(old):]
    return name


def check_tensor_names(names: Iterable[str], config: dict[str, Any], *, maps_transformers_siglip: bool) -> list[str]:
    """What vLLM's Gemma 3 would fail to load from these tensor names; empty when nothing.

    `config` is the checkpoint's config.json (for the layer counts). Checked: the SigLIP layout, tensors
    outside the modules vLLM loads, the tensors outside the layers, and that every layer of each stack
    holds what the others (and every Gemma 3 layer) hold: a tensor lost from one layer is named.
    """
    names = list(names)
    if not maps_transformers_siglip and has_transformers_siglip(names):
        return ["it keeps SigLIP under `vision_tower.*` (transformers 5's save_pretrained layout), which vLLM's "
                "Gemma 3 does not load (it looks for `vision_tower.vision_model.*`); keep "
                "engine.normalize_images_on_device on (our Gemma 3 variant maps both layouts), or requantize "
                "with jobs.quantize, which writes Google's layout"]
    loaded = {vllm_loaded_name(n, maps_transformers_siglip) for n in names}
    problems = []
    stray = sorted(n for n in loaded if not n.startswith(LOADED_ROOTS))
    if stray:
        problems.append(f"{len(stray)} tensors are outside the modules vLLM's Gemma 3 loads, e.g. {stray[0]!r}")
    missing = [n for n in REQUIRED if n not in loaded]
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    for label, prefix, section, every_layer in LAYER_STACKS:
        problems += _layer_problems(label, prefix, (config.get(section) or {}).get("num_hidden_layers"),
                                    every_layer, loaded)
    return problems


def _layer_problems(label: str, prefix: str, expected_layers: Optional[int], every_layer: tuple[str, ...],
                    loaded: set[str]) -> list[str]:
    by_layer: dict[int, set[str]] = {}
    for name in loaded:
        if name.startswith(prefix):
            index, _, rest = name[len(prefix):].partition(".")
            if index.isdigit():
                by_layer.setdefault(int(index), set()).add(rest)
    count = expected_layers if isinstance(expected_layers, int) else len(by_layer)
    problems = []
    absent = [i for i in range(count) if i not in by_layer]
    extra = sorted(i for i in by_layer if i >= count)
    if absent:
        problems.append(f"{label} layers {_ranges(absent)} of {count} have no tensors")
    if extra:
        problems.append(f"{label} layers {_ranges(extra)} are beyond the config's {count}")
    expected = set(every_layer).union(*by_layer.values()) if by_layer else set()
    for index in sorted(by_layer):
        lacking = sorted(expected - by_layer[index])
        if lacking:
            problems.append(f"{label} layer {index} lacks {', '.join(lacking[:4])}"
                            + (f" and {len(lacking) - 4} more" if len(lacking) > 4 else ""))
    return problems


def _ranges(indexes: list[int]) -> str:
    return ", ".join(str(i) for i in indexes[:8]) + (" ..." if len(indexes) > 8 else "")


# ------------------------------------------------------------------------------ reading and rewriting
def safetensors_header_names(header: bytes) -> list[str]:
    """Tensor names from a safetensors header (the JSON after the 8-byte length)."""
    return [name for name in json.loads(header) if name != "__metadata__"]


def read_local_names(directory: Path) -> list[str]:
    """Every tensor name of a local checkpoint, from its shards' headers (a few KB each; no tensor read)."""
    names: list[str] = []
    for shard in sorted(directory.glob("*.safetensors")):
        with open(shard, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            names += safetensors_header_names(handle.read(length))
    return names


def to_google_layout(directory: Path) -> int:
    """Rename transformers 5's SigLIP tensors to Google's layout, in place; returns how many were renamed.

    Only shards holding such tensors are rewritten (the 12B's vision tower is in one of five shards),
    each through a temporary file and a rename, and the index last.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    renamed = 0
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as handle:
            metadata = handle.metadata() or {"format": "pt"}
            if not has_transformers_siglip(handle.keys()):
                continue
        tensors = load_file(str(shard))
        renamed += sum(1 for k in tensors if to_google_name(k) != k)
        partial = shard.with_name(shard.name + ".partial")
        save_file({to_google_name(k): v for k, v in tensors.items()}, str(partial), metadata=metadata)
        partial.replace(shard)
    index = directory / INDEX_NAME
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {to_google_name(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))
    return renamed
