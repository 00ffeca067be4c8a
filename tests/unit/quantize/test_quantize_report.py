"""The verification behind the quantization report, on small hand-made checkpoints (no llm-compressor):
it must catch every way a quantized checkpoint can differ from what FP8-dynamic promises."""
import json

import pytest
import torch
from safetensors.torch import save_file

from pipeline.quantize.verify import kept_category, relative_error, render_markdown, verify_checkpoint

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


def fp8_per_channel(weight):
    scale = weight.float().abs().amax(dim=1, keepdim=True) / FP8_MAX
    return (weight.float() / scale).to(torch.float8_e4m3fn), scale.to(torch.bfloat16)


def source_tensors():
    generator = torch.Generator().manual_seed(0)
    return {
        "language_model.model.layers.0.self_attn.q_proj.weight": torch.randn(64, 32, generator=generator).bfloat16(),
        "language_model.model.layers.0.input_layernorm.weight": torch.randn(32, generator=generator).bfloat16(),
        "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight": torch.randn(16, 8, generator=generator).bfloat16(),
        "multi_modal_projector.mm_input_projection_weight": torch.randn(8, 32, generator=generator).bfloat16(),
    }


def quantize(tensors):
    out = dict(tensors)
    name = "language_model.model.layers.0.self_attn.q_proj.weight"
    out[name], out[name.replace("weight", "weight_scale")] = fp8_per_channel(tensors[name])
    return out


def write(directory, tensors):
    directory.mkdir()
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def test_a_faithful_checkpoint_passes(tmp_path):
    source = source_tensors()
    check = verify_checkpoint(write(tmp_path / "src", source), write(tmp_path / "out", quantize(source)))
    assert check["passed"], check["problems"]
    [layer] = check["layers"]
    assert layer["module"] == "language_model.model.layers.0.self_attn.q_proj"
    assert layer["shape"] == [64, 32] and layer["scale_shape"] == [64, 1] and layer["dtype"] == "float8_e4m3fn"
    assert 0.01 < layer["relative_error"] < 0.04
    assert check["kept_in_source_dtype"]["tensors_by_part"] == {
        "multimodal projector": 1, "norms": 1, "vision tower": 1}
    assert check["kept_in_source_dtype"]["lm_head"].startswith("tied")


@pytest.mark.parametrize("corrupt, problem", [
    pytest.param(lambda t: t.update({"vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight":
                                     t["vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"] + 1}),
                 "not quantized, yet differs", id="vision-tower-changed"),
    pytest.param(lambda t: t.update({"vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight":
                                     t["vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"].float()}),
                 "not quantized, yet differs", id="dtype-changed"),
    pytest.param(lambda t: t.pop("multi_modal_projector.mm_input_projection_weight"),
                 "missing from the output", id="tensor-dropped"),
    pytest.param(lambda t: t.update({"extra.weight": torch.zeros(2)}), "not in the source", id="tensor-invented"),
    pytest.param(lambda t: t.update({"language_model.model.layers.0.self_attn.q_proj.weight_scale":
                                     torch.ones(1, 1, dtype=torch.bfloat16)}),
                 "per-channel scale [64, 1]", id="per-tensor-scale"),
    pytest.param(lambda t: t.update({"language_model.model.layers.0.self_attn.q_proj.weight_scale":
                                     t["language_model.model.layers.0.self_attn.q_proj.weight_scale"] * 2}),
                 "relative error", id="wrong-scale"),
    pytest.param(lambda t: t.update({"language_model.model.layers.0.self_attn.q_proj.weight":
                                     t["language_model.model.layers.0.self_attn.q_proj.weight"].to(torch.bfloat16)}),
                 "expected float8_e4m3fn", id="not-fp8"),
])
def test_every_kind_of_damage_is_a_problem(tmp_path, corrupt, problem):
    source = source_tensors()
    output = quantize(source)
    corrupt(output)
    check = verify_checkpoint(write(tmp_path / "src", source), write(tmp_path / "out", output))
    assert not check["passed"]
    assert any(problem in p for p in check["problems"]), check["problems"]


def test_sharded_checkpoints_are_read_through_their_index(tmp_path):
    source = source_tensors()
    names = sorted(source)
    src = tmp_path / "src"
    src.mkdir()
    save_file({n: source[n] for n in names[:2]}, str(src / "model-00001-of-00002.safetensors"))
    save_file({n: source[n] for n in names[2:]}, str(src / "model-00002-of-00002.safetensors"))
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        n: f"model-0000{1 + (i >= 2)}-of-00002.safetensors" for i, n in enumerate(names)}}))
    check = verify_checkpoint(src, write(tmp_path / "out", quantize(source)))
    assert check["passed"], check["problems"]
    assert check["bytes"]["before"] == sum(p.stat().st_size for p in src.glob("*.safetensors"))


def test_relative_error_is_exact_for_representable_weights():
    weight = torch.tensor([[112.0, -56.0, 28.0], [448.0, 0.0, -224.0]])  # scales 0.25 and 1: exact
    quantized, scale = fp8_per_channel(weight)
    assert relative_error(weight, quantized, scale) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("name, part", [
    ("vision_tower.vision_model.encoder.layers.3.self_attn.q_proj.weight", "vision tower"),
    ("multi_modal_projector.mm_soft_emb_norm.weight", "multimodal projector"),
    ("language_model.model.embed_tokens.weight", "embeddings"),
    ("language_model.lm_head.weight", "lm_head"),
    ("language_model.model.layers.0.self_attn.q_norm.weight", "norms"),
    ("language_model.model.layers.0.mlp.up_proj.weight", "other"),
])
def test_kept_categories(name, part):
    assert kept_category(name) == part


def test_markdown_lists_problems_and_layers(tmp_path):
    source = source_tensors()
    output = quantize(source)
    output.pop("multi_modal_projector.mm_input_projection_weight")
    check = verify_checkpoint(write(tmp_path / "src", source), write(tmp_path / "out", output))
    report = {"source": "s", "output": "o", "scheme_description": "FP8", "ignore": ["re:.*vision_tower.*"],
              "versions": {"torch": "x"}, "wall_s": 1.0, "timings_s": {"quantize": 0.5}, "check": check}
    markdown = render_markdown(report)
    assert "| verification | FAILED (1 problems) |" in markdown
    assert "## Problems" in markdown and "missing from the output" in markdown
    assert "`language_model.model.layers.0.self_attn.q_proj` | [64, 32] |" in markdown
