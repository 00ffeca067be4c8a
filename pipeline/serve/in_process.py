"""One-GPU engine replicas run the model in vLLM's engine-core process, as `vllm serve` does.

`ray.serve.llm` (Ray 2.60) gives vLLM the Ray executor on GPUs at every size. A replica of one GPU then
runs its model in a separate Ray worker process, and every engine step crosses to it and back. `vllm
serve` runs a one-GPU model in the engine-core process ("uni"), and so does Ray's own batch stage
(`ray.data.llm` picks "uni" when a replica has one device). Measured on an H200 with the same checkpoint
and settings (docs/performance.md, fourth lease), 64 streams: 21.66 requests/s in-process against 20.43
with the Ray executor, latency p50 2.89 s against 3.08 s. With a fractional GPU (engine.gpu_share 0.5,
two replicas on one GPU) the Ray executor does not start at all: its worker asks Ray for a whole GPU,
which the replica's half-GPU bundle cannot hold.

Ray refuses `distributed_executor_backend` other than "ray" in engine_kwargs on GPUs, so the switch is
made in one place: where Ray's `VLLMEngine` hands vLLM its finished config (`_start_async_llm_engine`, a
private method; tests/unit/serve/test_in_process.py pins its signature, so a Ray upgrade that moves it
fails there and not on a GPU). The replica itself holds no GPU: Ray reserves the replica's GPU in the
first bundle of its placement group, for the worker it expected to start. Before the switch the replica
asks Ray which GPU that bundle is on (a tiny task placed in the bundle) and makes only that GPU visible
to the engine-core process it is about to spawn, so replicas on a node with several GPUs each get their own.

Turned on by `serve.in_process_engine` (the default); the replica reads it from its LLMConfig's
`experimental_configs`, under EXECUTOR_KEY.
"""
from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger("ray.serve")

# The key in LLMConfig.experimental_configs (Ray's free-form dict, carried to every replica) that asks
# for the in-process executor.
EXECUTOR_KEY = "pipeline_engine_executor"
IN_PROCESS = "uni"


def wanted(experimental_configs: dict[str, Any]) -> bool:
    return experimental_configs.get(EXECUTOR_KEY) == IN_PROCESS


def _bundle_accelerator_ids() -> list[str]:
    import ray

    return [str(i) for i in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]


def bundle_gpu_ids(placement_group, bundle_index: int = 0) -> list[str]:
    """The GPU ids (as Ray numbers them on that node) of one bundle of the placement group: a task that
    asks for a sliver of GPU inside the bundle is given the bundle's GPU."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    task = ray.remote(_bundle_accelerator_ids).options(
        num_cpus=0, num_gpus=0.001,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group,
                                                             placement_group_bundle_index=bundle_index))
    # A bundle without a GPU would leave the task unscheduled for ever: a clear error instead.
    return ray.get(task.remote(), timeout=120)


def use_in_process_executor(vllm_config, placement_group, gpu_ids=bundle_gpu_ids) -> str | None:
    """Switch a one-worker engine config to the in-process executor, with only its bundle's GPU visible
    to this process and the engine-core process it starts. Returns the devices made visible; None (and
    nothing changed) for an engine of several workers, which needs Ray's executor."""
    if vllm_config.parallel_config.world_size != 1:
        return None
    ids = gpu_ids(placement_group)
    if not ids:
        raise RuntimeError("the engine replica's placement group bundle holds no GPU; set "
                           "serve.in_process_engine=false to use Ray's executor")
    visible = ",".join(ids)
    os.environ["CUDA_VISIBLE_DEVICES"] = visible
    vllm_config.parallel_config.distributed_executor_backend = IN_PROCESS
    logger.info("engine runs in-process (vLLM's uni executor) on GPU %s of this node", visible)
    return visible


def in_process_engine_class():
    """Ray's VLLMEngine with the switch above at its one hand-over point."""
    from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine

    class InProcessVLLMEngine(VLLMEngine):
        def _start_async_llm_engine(self, vllm_engine_args, vllm_engine_config, placement_group):
            use_in_process_executor(vllm_engine_config, placement_group)
            return super()._start_async_llm_engine(vllm_engine_args, vllm_engine_config, placement_group)

    return InProcessVLLMEngine
