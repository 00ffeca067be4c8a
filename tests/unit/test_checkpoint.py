import json

import pytest

from pipeline.checkpoint import CheckpointError, check_checkpoint, inspect_checkpoint, is_ignored
from pipeline.config import StorageSection

FP8_DYNAMIC_GROUP = {
    "targets": ["Linear"],
    "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
    "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True},
}
# As published in RedHatAI/gemma-3-12b-it-FP8-dynamic (regex ignores) and as written by llm-compressor.
REGEX_IGNORE = ["re:.*lm_head", "re:vision_tower.*", "re:multi_modal_projector.*"]


def checkpoint(tmp_path, quantization=None, name="m"):
    folder = tmp_path / name
    folder.mkdir()
    config = {"architectures": ["Gemma3ForConditionalGeneration"], "torch_dtype": "bfloat16"}
    if quantization is not None:
        config["quantization_config"] = quantization
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def fp8(ignore, group=FP8_DYNAMIC_GROUP):
    return {"quant_method": "compressed-tensors", "format": "float-quantized",
            "config_groups": {"group_0": group}, "ignore": ignore}


def test_fp8_dynamic_with_regex_ignores_is_accepted(tmp_path):
    info = inspect_checkpoint(checkpoint(tmp_path, fp8(REGEX_IGNORE)), StorageSection())
    assert info.scheme == "fp8-dynamic" and info.architecture == "Gemma3ForConditionalGeneration"
    check_checkpoint(info, "fp8-dynamic")
    check_checkpoint(info, "any")


def test_plain_bf16_is_refused_where_fp8_is_expected(tmp_path):
    info = inspect_checkpoint(checkpoint(tmp_path), StorageSection())
    assert info.scheme == "none"
    with pytest.raises(CheckpointError, match="holds scheme 'none' but model.quantization is 'fp8-dynamic'"):
        check_checkpoint(info, "fp8-dynamic")


def test_quantized_vision_tower_is_refused(tmp_path):
    # Names written as they appear in the checkpoint: transformers renames the modules on load and the
    # vision tower ends up quantized (NOTES §4).
    info = inspect_checkpoint(checkpoint(tmp_path, fp8(["lm_head"])), StorageSection())
    with pytest.raises(CheckpointError, match="quantizes the vision tower, multimodal projector"):
        check_checkpoint(info, "fp8-dynamic")


def test_other_schemes_are_named(tmp_path):
    static = dict(FP8_DYNAMIC_GROUP, input_activations={"num_bits": 8, "type": "float", "strategy": "tensor",
                                                        "dynamic": False})
    info = inspect_checkpoint(checkpoint(tmp_path, fp8(REGEX_IGNORE, static)), StorageSection())
    assert info.scheme == "compressed-tensors:float/8/channel/tensor"
    with pytest.raises(CheckpointError):
        check_checkpoint(info, "fp8-dynamic")
    awq = inspect_checkpoint(checkpoint(tmp_path, {"quant_method": "awq"}, "awq"), StorageSection())
    assert awq.scheme == "awq"


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        inspect_checkpoint(str(tmp_path), StorageSection())


@pytest.mark.parametrize("module, ignore, expected", [
    ("lm_head", ["lm_head"], True),
    ("language_model.lm_head", ["lm_head"], True),
    ("vision_tower.vision_model.encoder.layers.0.self_attn.q_proj", ["re:vision_tower.*"], True),
    ("vision_tower.vision_model.encoder.layers.0.self_attn.q_proj", ["re:.*vision_tower.*"], True),
    ("language_model.model.layers.0.self_attn.q_proj", REGEX_IGNORE, False),
])
def test_ignore_semantics(module, ignore, expected):
    assert is_ignored(module, ignore) is expected
