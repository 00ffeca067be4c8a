"""The dry run's plan: stages, replicas, placement and the memory estimate, from config and checkpoint."""
import json

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from pipeline.batch.caption import InputPlan, ModelPlan
from pipeline.engine.checkpoint import CheckpointInfo, checkpoint_weight_bytes
from pipeline.config import PipelineConfig, StorageSection
from pipeline.io.images import ImageTarget
from pipeline.batch.plan import (build_plan, cluster_yaml_gpu_node, cpu_budget, format_cpu_budget, format_plan,
                           kv_bytes_per_sequence, memory_estimate, output_state)

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
                     '"tensor_parallel_size": 2', "CPU budget:", "needed ~0.3 CPUs per GPU for preparation",
                     "no GPU in the cluster's resources: CPUs per GPU not checked"):
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


def _gpu_config(*overrides: str) -> PipelineConfig:
    return PipelineConfig.load(overrides=["engine.device=gpu", *overrides], environ={})


def test_cpu_budget_warns_when_the_cpus_per_gpu_cannot_feed_the_engines():
    # W2-like cost: 60 ms per image x 27.2 images/s x 1.5 = 2.45 CPUs per GPU; 4 GPUs and 8 CPUs leave
    # (8 - 4 engine bundle CPUs) / 4 = 1 per GPU.
    config = _gpu_config("batch.engine_replicas=4", "batch.prepare_replicas=[1,16]",
                         "batch.prepare_cpu_s_per_image=0.06", "batch.engine_images_per_s=27.2")
    budget = cpu_budget(config, 8.0, 4.0, "the Ray cluster")
    assert budget["checked"] and budget["engine_gpus"] == 4 and budget["engine_cpus"] == 4
    assert budget["available_cpus_per_gpu"] == pytest.approx(1.0)
    assert budget["needed_cpus_per_gpu"] == pytest.approx(0.06 * 27.2 * 1.5)
    [warning] = budget["warnings"]
    assert "leaves 1.0 CPUs per GPU" in warning and "need ~2.4" in warning
    assert "more CPUs per GPU" in warning and "8 CPUs feed ~2 GPU(s)" in warning  # 8 // (1 + 2.448)
    text = "\n".join(format_cpu_budget(budget))
    assert "WARNING: the Ray cluster leaves 1.0 CPUs per GPU" in text


def test_cpu_budget_is_silent_when_the_cluster_has_enough():
    # cluster.yaml's L40S node: 48 CPUs, 4 GPUs; W1's default cost needs ~0.3 CPUs per GPU.
    config = _gpu_config("batch.engine_replicas=[1,8]", "batch.prepare_replicas=[1,8]")
    budget = cpu_budget(config, 48.0, 4.0, "cluster.yaml's GPU node type gpu_l40s_x4")
    assert budget["checked"] and budget["warnings"] == []
    assert budget["available_cpus_per_gpu"] == pytest.approx((48 - 4) / 4)
    text = "\n".join(format_cpu_budget(budget))
    assert "available 11.0 CPUs per GPU on cluster.yaml's GPU node type gpu_l40s_x4" in text and ": enough" in text
    assert "WARNING" not in text


def test_cpu_budget_warns_when_the_preparation_pool_is_too_small():
    # Plenty of CPUs, but 8 replicas x 2.45 CPUs per GPU = 19.6 cores of preparation from at most 8 workers.
    config = _gpu_config("batch.engine_replicas=[1,8]", "batch.prepare_replicas=[1,8]",
                         "batch.prepare_cpu_s_per_image=0.06")
    [warning] = cpu_budget(config, 192.0, 8.0, "the Ray cluster")["warnings"]
    assert "at most 8 preparation workers" in warning and "batch.prepare_replicas to [.., 20]" in warning


def test_cpu_budget_warns_when_one_front_end_cannot_keep_up():
    # TP=4 at 27.2 images/s per GPU sends ~109 images/s through one front-end process (~100 at most).
    config = _gpu_config("batch.engine_replicas=1", "engine.tensor_parallel_size=4")
    warnings = cpu_budget(config, 64.0, 4.0, "the Ray cluster")["warnings"]
    assert any("front-end (one process per replica)" in w and "whatever the CPU count" in w for w in warnings)


def test_cpu_budget_unchecked_without_gpus_or_on_a_cpu_engine():
    budget = cpu_budget(_gpu_config(), 16.0, 0.0, "the Ray cluster")
    assert not budget["checked"] and "not checked" in budget["reason"] and budget["warnings"] == []
    cpu_engine = PipelineConfig.load("configs/tiny-cpu.yaml", environ={})
    assert cpu_budget(cpu_engine, 8.0, None, "the Ray cluster")["reason"] == "CPU engine: not checked"


def test_cluster_yaml_gpu_node_type(tmp_path):
    assert cluster_yaml_gpu_node("cluster.yaml") == (48.0, 4.0, "gpu_l40s_x4")
    (tmp_path / "c.yaml").write_text("available_node_types: {head: {resources: {CPU: 0}}}")
    assert cluster_yaml_gpu_node(str(tmp_path / "c.yaml")) is None
    assert cluster_yaml_gpu_node(str(tmp_path / "missing.yaml")) is None
