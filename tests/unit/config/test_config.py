import pytest

from pipeline.config import ConfigError, PipelineConfig
from pipeline.engine.args import engine_kwargs, fixed_or_range, placement_group

CPU = ["engine.device=cpu", "engine.kv_cache_memory_bytes=1073741824"]


def test_defaults_mirror_the_seed_deployment_but_the_measured_layout():
    config = PipelineConfig.load(environ={})
    # One GPU per replica, not the seed's TP=4: measured on a 4 x H200 node (docs/performance.md).
    assert config.engine.tensor_parallel_size == 1
    assert config.engine.gpu_memory_utilization == 0.9
    assert config.engine.max_model_len == 8192
    assert config.model.served_name == "gemma-3-12b-it"
    assert config.model.quantization == "fp8-dynamic"
    assert config.engine.device == "gpu"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("engine:\n  max_num_seqs: 64\nbatch:\n  rows_per_file: 7\n")
    config = PipelineConfig.load(path, ["engine.max_num_seqs=32", "batch.engine_replicas=[2, 6]",
                                        "sampling.stop=['END']"], environ={})
    assert config.engine.max_num_seqs == 32
    assert config.batch.rows_per_file == 7
    assert config.batch.engine_replicas == (2, 6)
    assert config.sampling.stop == ["END"]


@pytest.mark.parametrize("overrides, expected", [
    pytest.param(["engine.max_num_seq=3"], "engine.max_num_seq: unknown field; allowed: device,", id="typo-names-allowed"),
    pytest.param(["engine.device=tpu"], "engine.device: Input should be 'gpu' or 'cpu'", id="literal"),
    pytest.param(["batch.engine_replicas=[5, 2]"], "1 <= min <= max", id="concurrency-order"),
    pytest.param(["batch.engine_replicas=0"], "engine_replicas must be >= 1", id="concurrency-zero"),
    pytest.param(["engine.device=cpu"], "kv_cache_memory_bytes is required", id="cpu-needs-kv-cap"),
    pytest.param(["engine.gpu_share=0.5", "engine.tensor_parallel_size=2", "engine.gpu_memory_utilization=0.45",
                  "engine.kv_cache_memory_bytes=1"], "a TP group shares no GPU", id="share-needs-tp1"),
    pytest.param(["engine.gpu_share=0.5", "engine.kv_cache_memory_bytes=1"],
                 "gpu_memory_utilization (0.9) exceeds engine.gpu_share (0.5)", id="share-vs-memory"),
    pytest.param(["engine.gpu_share=0.5", "engine.gpu_memory_utilization=0.45"],
                 "kv_cache_memory_bytes is required with engine.gpu_share below 1", id="share-needs-kv-cap"),
    pytest.param(["sampling.max_tokens=9000"], "must be below engine.max_model_len", id="tokens-vs-context"),
    pytest.param(["engine.extra_engine_kwargs={kv_cache_dtype: fp8}"],
                 "['kv_cache_dtype'] have typed fields: set engine.kv_cache_dtype instead", id="typed-not-extra"),
    pytest.param(["engine.kv_cache_dtype=int8"], "engine.kv_cache_dtype: Input should be 'auto', 'fp8'",
                 id="kv-dtype-literal"),
    pytest.param(["nonsense"], "expected section.field=value", id="bad-override"),
    pytest.param(["model.quantization=fp8"], "model.quantization: Input should be 'fp8-dynamic', 'none' or 'any' "
                 "(got 'fp8')", id="literal-lists-allowed-and-given"),
    pytest.param(["batch.engine_replicas=abc"], "batch.engine_replicas: expected one of: an int (fixed pool), "
                 "[min, max] (autoscaling pool) (got 'abc')", id="union-folded-into-one-line"),
    pytest.param(["engine=3"], "engine: expected a section (mapping) with fields: device, tensor_parallel_size",
                 id="section-not-a-mapping"),
    pytest.param(["nosuch.field=1"], "nosuch: unknown field; allowed: model, engine, sampling, images, fetch, "
                 "storage, batch, serve, tools, runtime, openai_batch, report", id="unknown-section"),
    pytest.param(["report.gpu_hourly_usd=-1"], "report.gpu_hourly_usd: Input should be greater than or equal to 0 "
                 "(got -1)", id="bound-shows-value"),
    pytest.param(["runtime.metrics_export_port=70000"], "runtime.metrics_export_port: Input should be less than "
                 "or equal to 65535", id="port-range"),
])
def test_errors_name_the_field(overrides, expected):
    with pytest.raises(ConfigError) as info:
        PipelineConfig.load(overrides=overrides, environ={})
    assert expected in str(info.value)


def test_environment_fills_storage_and_ray_address_only_when_unset():
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_REGION": "eu-west-1", "RAY_ADDRESS": "auto"}
    config = PipelineConfig.load(environ=env)
    assert (config.storage.endpoint_url, config.storage.region, config.runtime.ray_address) == \
        ("http://127.0.0.1:9000", "eu-west-1", "auto")
    explicit = PipelineConfig.load(overrides=["storage.endpoint_url=http://other:1"], environ=env)
    assert explicit.storage.endpoint_url == "http://other:1"


def test_engine_kwargs_gpu_and_cpu():
    tp4 = PipelineConfig.load(overrides=["engine.tensor_parallel_size=4"], environ={})
    gpu = engine_kwargs(tp4)
    assert gpu["tensor_parallel_size"] == 4 and gpu["gpu_memory_utilization"] == 0.9
    assert gpu["max_model_len"] == 8192 and gpu["limit_mm_per_prompt"] == {"image": 1}
    assert "kv_cache_memory_bytes" not in gpu and "kv_cache_dtype" not in gpu   # vLLM's own default: the model's
    fp8_kv = PipelineConfig.load(overrides=["engine.kv_cache_dtype=fp8"], environ={})
    assert engine_kwargs(fp8_kv)["kv_cache_dtype"] == "fp8"
    cpu_config = PipelineConfig.load(overrides=CPU + ["engine.tensor_parallel_size=1",
                                                      "engine.extra_engine_kwargs={mm_processor_cache_gb: 0}"],
                                     environ={})
    cpu = engine_kwargs(cpu_config)
    assert "gpu_memory_utilization" not in cpu and cpu["kv_cache_memory_bytes"] == 1073741824
    assert cpu["mm_processor_cache_gb"] == 0
    assert placement_group(cpu_config) == {"bundles": [{"CPU": 1}], "strategy": "STRICT_PACK"}
    assert placement_group(tp4)["bundles"] == [{"GPU": 1, "CPU": 1}] * 4
    assert placement_group(PipelineConfig.load(environ={}))["bundles"] == [{"GPU": 1, "CPU": 1}]


def test_int_concurrency_means_fixed_pool():
    assert fixed_or_range(3) == (3, 3)
    assert fixed_or_range((1, 8)) == (1, 8)


def test_yaml_round_trip(tmp_path):
    config = PipelineConfig.load(overrides=CPU, environ={})
    path = tmp_path / "out.yaml"
    path.write_text(config.to_yaml())
    assert PipelineConfig.load(path, environ={}) == config


@pytest.mark.parametrize("overrides, message", [
    pytest.param(["tools.builtins=[shell]"], "tools.builtins.0: Input should be 'calculate', 'lookup' or "
                 "'image_metadata'", id="unknown-builtin"),
    pytest.param(["tools.builtins=[lookup]"], "tools.builtins has 'lookup' but tools.tables is empty",
                 id="lookup-without-tables"),
    pytest.param(["tools.max_rounds=0"], "tools.max_rounds: Input should be greater than or equal to 1",
                 id="no-rounds"),
])
def test_tools_section_is_checked(overrides, message):
    with pytest.raises(ConfigError) as caught:
        PipelineConfig.load(overrides=overrides, environ={})
    assert message in str(caught.value)


def test_endpoint_tool_arguments_name_the_plugin_and_template():
    from pathlib import Path

    from pipeline.engine.args import tool_serving_kwargs

    kwargs = tool_serving_kwargs(PipelineConfig.load(environ={}))
    assert kwargs["enable_auto_tool_choice"] and kwargs["tool_call_parser"] == "gemma3"
    assert Path(kwargs["tool_parser_plugin"]).name == "tool_parser.py" and Path(kwargs["tool_parser_plugin"]).exists()
    assert Path(kwargs["chat_template"]).name == "gemma3_tools.jinja" and Path(kwargs["chat_template"]).exists()
    assert not set(kwargs) & set(engine_kwargs(PipelineConfig.load(environ={}))), "never batch engine args"


def test_union_errors_are_one_line_per_field():
    with pytest.raises(ConfigError) as info:
        PipelineConfig.load(overrides=["batch.engine_replicas=[1,2,3]"], environ={})
    lines = str(info.value).splitlines()
    assert lines[1:] == ["  batch.engine_replicas: expected one of: an int (fixed pool), [min, max] (autoscaling "
                         "pool) (got (1, 2, 3))"]


def test_report_and_metrics_fields():
    config = PipelineConfig.load(overrides=["report.gpu_hourly_usd=2.49", "runtime.metrics_export_port=8080"],
                                 environ={})
    assert config.report.gpu_hourly_usd == 2.49 and config.report.enabled and config.report.billed_gpus is None
    assert config.runtime.metrics_export_port == 8080 and config.runtime.engine_metrics


def test_two_replicas_per_gpu_reserve_half_a_gpu_each():
    from pipeline.engine.args import gpus_per_replica

    config = PipelineConfig.load(overrides=["engine.gpu_share=0.5", "engine.gpu_memory_utilization=0.45",
                                            "engine.kv_cache_memory_bytes=17179869184"], environ={})
    assert placement_group(config) == {"bundles": [{"GPU": 0.5, "CPU": 1}], "strategy": "STRICT_PACK"}
    assert gpus_per_replica(config) == 0.5
    kwargs = engine_kwargs(config)
    assert kwargs["gpu_memory_utilization"] == 0.45 and kwargs["kv_cache_memory_bytes"] == 17179869184
