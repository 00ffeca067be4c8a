"""Replicas per GPU reach Ray Data as a fractional GPU: `engine.gpu_share` 0.5 gives each vLLM engine
actor half a GPU, so Ray places two on every GPU. Checked on the real `ray.data.llm.build_processor`
(in a child process: it starts a local Ray, which no other unit test shares)."""
import json
import os
import subprocess
import sys

SCRIPT = """
import json, sys, ray
from ray.data.llm import build_processor
from pipeline.batch.caption import processor_config
from pipeline.config import PipelineConfig
model, layouts = sys.argv[1], json.loads(sys.argv[2])
for name, overrides in layouts.items():
    config = PipelineConfig.load(overrides=overrides + ["model.source=" + model], environ={})
    stages = build_processor(processor_config(config)).stages
    engine = stages["vLLMEngineStage"]
    compute = engine.map_batches_kwargs["compute"]
    print("STAGE", name, json.dumps({"num_gpus": engine.map_batches_kwargs.get("num_gpus"),
                                     "replicas": [compute.min_size, compute.max_size]}))
ray.shutdown()
"""


def engine_stages(model, layouts: dict[str, list[str]]) -> dict[str, dict]:
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(model), json.dumps(layouts)],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    found = {}
    for line in result.stdout.splitlines():
        if line.startswith("STAGE "):
            _, name, payload = line.split(" ", 2)
            found[name] = json.loads(payload)
    assert found.keys() == layouts.keys(), result.stdout[-2000:] + result.stderr[-3000:]
    return found


def test_two_replicas_per_gpu_ask_ray_for_half_a_gpu_each(tiny_model):
    stages = engine_stages(tiny_model, {
        "shared": ["engine.gpu_share=0.5", "engine.gpu_memory_utilization=0.45",
                   "engine.kv_cache_memory_bytes=17179869184", "batch.engine_replicas=2"],
        "whole": ["batch.engine_replicas=2"],
    })
    assert stages["shared"] == {"num_gpus": 0.5, "replicas": [2, 2]}
    assert stages["whole"] == {"num_gpus": 1, "replicas": [2, 2]}
