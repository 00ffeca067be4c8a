"""runtime.kernel_cache_dir: vLLM's, Triton's and Inductor's caches under one directory that outlives the
engine, in the environment of every engine process, batch and online alike."""
from __future__ import annotations

import pytest

from pipeline.config import ConfigError, PipelineConfig
from pipeline.engine.args import runtime_env
from pipeline.serve.app import llm_config_args


def test_the_cache_variables_reach_batch_and_online_engines():
    config = PipelineConfig.load(overrides=["runtime.kernel_cache_dir=/mnt/kernels/", "runtime.env_vars={HF_HUB_OFFLINE: '1'}"],
                                 environ={})
    expected = {"VLLM_CACHE_ROOT": "/mnt/kernels/vllm", "TRITON_CACHE_DIR": "/mnt/kernels/triton",
                "TORCHINDUCTOR_CACHE_DIR": "/mnt/kernels/inductor", "HF_HUB_OFFLINE": "1"}
    assert runtime_env(config) == {"env_vars": expected}  # ray.data.llm's engine stage (batch)
    assert llm_config_args(config)["runtime_env"] == {"env_vars": expected}  # the Serve engine replica


def test_a_name_set_in_env_vars_keeps_its_value_and_none_sets_nothing():
    config = PipelineConfig.load(overrides=["runtime.kernel_cache_dir=/cache",
                                            "runtime.env_vars={TRITON_CACHE_DIR: /fast/triton}"], environ={})
    assert config.runtime.process_env_vars()["TRITON_CACHE_DIR"] == "/fast/triton"
    assert config.runtime.process_env_vars()["VLLM_CACHE_ROOT"] == "/cache/vllm"
    assert runtime_env(PipelineConfig.load(environ={})) is None


@pytest.mark.parametrize("value", ["cache", "./kernels", "s3://bucket/kernels"])
def test_a_relative_or_remote_cache_dir_is_refused(value: str):
    with pytest.raises(ConfigError, match="absolute local path"):
        PipelineConfig.load(overrides=[f"runtime.kernel_cache_dir={value}"], environ={})
