import json
import logging
from pathlib import Path

import pytest

from pipeline.engine.checkpoint import CheckpointError, check_checkpoint, inspect_checkpoint, is_ignored
from pipeline.config import StorageSection

FIXTURES = Path(__file__).parents[1] / "fixtures" / "quantization_configs"
FP8_DYNAMIC_GROUP = {
    "targets": ["Linear"],
    "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
    "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True},
}
# The regex ignores of neuralmagic/RedHatAI FP8-dynamic recipes for vision models.
REGEX_IGNORE = ["re:.*lm_head", "re:vision_tower.*", "re:multi_modal_projector.*"]


def checkpoint(tmp_path, quantization=None, name="m", tie_word_embeddings=None):
    folder = tmp_path / name
    folder.mkdir()
    config = {"architectures": ["Gemma3ForConditionalGeneration"], "torch_dtype": "bfloat16"}
    if quantization is not None:
        config["quantization_config"] = quantization
    if tie_word_embeddings is not None:
        config["text_config"] = {"tie_word_embeddings": tie_word_embeddings}
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
    info = inspect_checkpoint(checkpoint(tmp_path, fp8(["lm_head"])), StorageSection())
    with pytest.raises(CheckpointError, match="quantizes the vision tower "):
        check_checkpoint(info, "fp8-dynamic")


def test_untied_lm_head_must_be_ignored(tmp_path):
    vision_only = ["re:.*vision_tower.*"]
    tied = inspect_checkpoint(checkpoint(tmp_path, fp8(vision_only), "tied"), StorageSection())
    check_checkpoint(tied, "fp8-dynamic")  # a tied lm_head is the embedding: never quantized
    untied = inspect_checkpoint(checkpoint(tmp_path, fp8(vision_only), "untied", False), StorageSection())
    with pytest.raises(CheckpointError, match="quantizes the lm_head"):
        check_checkpoint(untied, "fp8-dynamic")


@pytest.mark.parametrize("fixture, accepted, transformers_safe", [
    pytest.param("model_free_ptq_regex_ignore", True, True, id="jobs.quantize-output"),
    pytest.param("model_free_ptq_exact_names", True, False, id="exact-checkpoint-names"),
    pytest.param("oneshot_regex_ignore", True, False, id="oneshot-expands-regexes"),
    pytest.param("oneshot_anchored_regex_ignore", False, False, id="oneshot-quantized-vision-tower"),
])
def test_configs_written_by_llm_compressor(tmp_path, caplog, fixture, accepted, transformers_safe):
    """Configs as llm-compressor 0.14 writes them (fixtures/quantization_configs/README.md)."""
    quantization = json.loads((FIXTURES / f"{fixture}.json").read_text())
    info = inspect_checkpoint(checkpoint(tmp_path, quantization), StorageSection())
    assert info.scheme == "fp8-dynamic" and info.details["format"] == "float-quantized"
    caplog.set_level(logging.WARNING, logger="pipeline.engine.checkpoint")
    if not accepted:
        with pytest.raises(CheckpointError, match="quantizes the vision tower"):
            check_checkpoint(info, "fp8-dynamic")
        return
    check_checkpoint(info, "fp8-dynamic")
    warned = any("transformers would quantize the vision tower" in r.getMessage() for r in caplog.records)
    assert warned is not transformers_safe


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
    pytest.param("lm_head", ["lm_head"], True, id="exact"),
    pytest.param("language_model.lm_head", ["lm_head"], False, id="no-suffix-match-as-in-vllm"),
    pytest.param("vision_tower.vision_model.encoder.layers.0.self_attn.q_proj", ["re:vision_tower.*"], True,
                 id="anchored-regex-checkpoint-name"),
    pytest.param("model.vision_tower.encoder.layers.0.self_attn.q_proj", ["re:vision_tower.*"], False,
                 id="anchored-regex-misses-transformers-name"),
    pytest.param("model.vision_tower.encoder.layers.0.self_attn.q_proj", ["re:.*vision_tower.*"], True,
                 id="unanchored-regex"),
    pytest.param("language_model.model.layers.0.self_attn.q_proj", REGEX_IGNORE, False, id="text-layer"),
])
def test_ignore_semantics(module, ignore, expected):
    assert is_ignored(module, ignore) is expected
