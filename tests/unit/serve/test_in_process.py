"""One-GPU engine replicas run in vLLM's engine core (pipeline/serve/in_process.py).

The GPU itself cannot run here. What can: the config that asks for the switch, Ray's hand-over point
that the switch overrides (its signature, so a Ray upgrade that moves it fails here), the switch on a
vLLM-shaped config, and the GPU lookup on a real local Ray with GPUs *declared* to it (Ray assigns ids
to declared GPUs as it does to real ones; no CUDA is touched).
"""
from __future__ import annotations

import inspect
import os
from types import SimpleNamespace

import pytest

from pipeline.config import PipelineConfig
from pipeline.serve import in_process
from pipeline.serve.app import llm_config_args


def test_one_gpu_replicas_ask_for_the_in_process_executor():
    from ray.serve.llm import LLMConfig

    args = llm_config_args(PipelineConfig.load(environ={}))
    assert args["experimental_configs"] == {in_process.EXECUTOR_KEY: "uni"}
    assert in_process.wanted(LLMConfig(**args).experimental_configs)  # Ray's validator keeps our key
    # TP=4 needs Ray's executor across its GPUs; off restores it; the CPU engine never takes this path.
    tp4 = llm_config_args(PipelineConfig.load(overrides=["engine.tensor_parallel_size=4"], environ={}))
    off = llm_config_args(PipelineConfig.load(overrides=["serve.in_process_engine=false"], environ={}))
    cpu = llm_config_args(PipelineConfig.load(overrides=["engine.device=cpu", "engine.kv_cache_memory_bytes=1073741824"],
                                                environ={}))
    for other in (tp4, off, cpu):
        assert not in_process.wanted(other.get("experimental_configs", {}))


def test_a_shared_gpu_online_needs_the_in_process_engine():
    from pipeline.config import ConfigError

    shared = ["engine.gpu_share=0.5", "engine.gpu_memory_utilization=0.42", "engine.kv_cache_memory_bytes=17179869184"]
    assert in_process.wanted(llm_config_args(PipelineConfig.load(overrides=shared, environ={}))["experimental_configs"])
    with pytest.raises(ConfigError, match="whole GPU per worker"):
        llm_config_args(PipelineConfig.load(overrides=[*shared, "serve.in_process_engine=false"], environ={}))


def test_rays_hand_over_point_is_the_one_overridden():
    from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine

    assert list(inspect.signature(VLLMEngine._start_async_llm_engine).parameters) == [
        "self", "vllm_engine_args", "vllm_engine_config", "placement_group"]
    engine_cls = in_process.in_process_engine_class()
    assert issubclass(engine_cls, VLLMEngine)
    assert "_start_async_llm_engine" in vars(engine_cls)


def _vllm_config(world_size: int):
    return SimpleNamespace(parallel_config=SimpleNamespace(world_size=world_size, distributed_executor_backend="ray"))


def test_switch_pins_the_bundles_gpu_and_leaves_larger_engines_alone(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    one = _vllm_config(1)
    assert in_process.use_in_process_executor(one, "pg", gpu_ids=lambda pg: ["2"]) == "2"
    assert one.parallel_config.distributed_executor_backend == "uni"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2"  # the engine core it spawns sees its GPU only

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    four = _vllm_config(4)
    assert in_process.use_in_process_executor(four, "pg", gpu_ids=lambda pg: ["0"]) is None
    assert four.parallel_config.distributed_executor_backend == "ray"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"

    with pytest.raises(RuntimeError, match="serve.in_process_engine=false"):
        in_process.use_in_process_executor(_vllm_config(1), "pg", gpu_ids=lambda pg: [])


def test_each_replicas_bundle_is_found_on_its_own_gpu():
    """Real local Ray, two GPUs declared: two one-GPU placement groups, as two replicas on one node."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    ray.init(address="local", num_cpus=1, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        groups = [placement_group([{"GPU": 1, "CPU": 0.1}], strategy="STRICT_PACK") for _ in range(2)]
        ray.get([group.ready() for group in groups], timeout=60)
        found = [in_process.bundle_gpu_ids(group) for group in groups]
        assert sorted(found) == [["0"], ["1"]]
        for group in groups:
            remove_placement_group(group)
    finally:
        ray.shutdown()
