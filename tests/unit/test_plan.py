"""The dry run's plan: stages, replicas, placement and the memory estimate, from config and checkpoint."""
import json

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from pipeline.batch import InputPlan, ModelPlan
from pipeline.checkpoint import CheckpointInfo, checkpoint_weight_bytes
from pipeline.config import PipelineConfig, StorageSection
from pipeline.images import ImageTarget
from pipeline.plan import build_plan, format_plan, kv_bytes_per_sequence, memory_estimate, output_state

# Gemma-3-12b-it's text config: 48 layers, 5 sliding-window (1024) layers to each full-attention one.
GEMMA3_12B = {"text_config": {"num_hidden_layers": 48, "num_key_value_heads": 8, "head_dim": 256,
                              "sliding_window": 1024,
                              "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 8}}
FP8_12B_BYTES = 13_620_000_000


def test_kv_bytes_count_sliding_layers_up_to_their_window():
    # 2 (K, V) x 8 heads x 256 x 2 bytes = 8 KiB per token per layer; 8 full layers x 8192 + 40 x 1024.
    assert kv_bytes_per_sequence(GEMMA3_12B, 8192, 2) == 8192 * (8 * 8192 + 40 * 1024)
    assert kv_bytes_per_sequence(GEMMA3_12B, 512, 1) == 4096 * 48 * 512
    assert kv_bytes_per_sequence({"text_config": {}}, 8192, 2) is None


def test_gpu_memory_per_card():
    config = PipelineConfig.load(overrides=["engine.accelerator_type=H100", "engine.tensor_parallel_size=4"],
                                 environ={})  # utilisation 0.9 (default)
    memory = memory_estimate(config, FP8_12B_BYTES, GEMMA3_12B)
    assert memory["weights_per_rank_bytes"] == FP8_12B_BYTES / 4
    assert list(memory["cards"]) == ["H100"]
    h100 = memory["cards"]["H100"]
    assert h100["reserved_per_gpu_bytes"] == pytest.approx(0.9 * 81559 * 2**20)
    assert h100["kv_and_activations_per_gpu_bytes"] == pytest.approx(0.9 * 81559 * 2**20 - FP8_12B_BYTES / 4)
    per_seq_rank = 8192 * (8 * 8192 + 40 * 1024) / 4
    assert h100["full_sequences_that_fit"] == int(h100["kv_and_activations_per_gpu_bytes"] // per_seq_rank)
    unpinned = memory_estimate(PipelineConfig.load(environ={}), FP8_12B_BYTES, GEMMA3_12B)
    assert list(unpinned["cards"]) == ["H100", "L40S", "L4"], "examples when no accelerator type is pinned"


def _plans(rows: int = 1000):
    schema = pa.schema([("id", pa.string()), ("image", pa.binary())])
    input_plan = InputPlan("s3://b/in", pafs.LocalFileSystem(), "/in", schema, rows, frozenset({"x", "y"}), 3)
    model_plan = ModelPlan(CheckpointInfo("s3://m", "fp8-dynamic", "Gemma3ForConditionalGeneration"),
                           ImageTarget(896), [1, 106])
    return input_plan, model_plan


def test_plan_lists_stages_replicas_placement_and_memory():
    config = PipelineConfig.load(overrides=["batch.engine_replicas=[2,6]", "engine.tensor_parallel_size=2",
                                            "batch.rows_per_file=300"], environ={})
    input_plan, model_plan = _plans()
    plan = build_plan(config, input_plan=input_plan, model_plan=model_plan, output_uri="s3://b/out",
                      output="empty: the run writes here", weights_bytes=FP8_12B_BYTES, model_config=GEMMA3_12B)
    assert plan["engine"]["gpus_per_replica"] == 2 and plan["engine"]["gpus_at_most"] == 12
    assert plan["engine"]["placement_group"] == {"bundles": [{"GPU": 1, "CPU": 1}] * 2, "strategy": "STRICT_PACK"}
    engine_stage = next(s for s in plan["stages"] if "vLLM engine" in s["stage"])
    assert engine_stage["replicas"] == "2..6 (autoscaling)" and engine_stage["batch_size"] == 64
    text = format_plan(plan)
    for expected in ("1,000 rows, 2 duplicated ids", "3 rows without id", "replicas 2..6 (autoscaling)",
                     "2 GPU(s) per replica, 12 GPU(s) at most", "at least 4 files", "weights 12.68 GiB over 2 rank(s)",
                     "on H100 (79.65 GiB): vLLM reserves 71.68 GiB per GPU (143.37 GiB per replica)",
                     '"tensor_parallel_size": 2'):
        assert expected in text, (expected, text)


def test_output_state(tmp_path):
    fs = pafs.LocalFileSystem()
    assert output_state(fs, str(tmp_path / "none"), False).startswith("empty")
    (tmp_path / "_manifest.json").write_text("{}")
    assert "refuses it without --overwrite" in output_state(fs, str(tmp_path), False)
    assert "--overwrite replaces it" in output_state(fs, str(tmp_path), True)


def test_weight_bytes_from_index_or_files(tmp_path):
    storage = StorageSection()
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"x" * 10)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"x" * 5)
    assert checkpoint_weight_bytes(str(tmp_path), storage) == 15
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 999}}))
    assert checkpoint_weight_bytes(str(tmp_path), storage) == 999
