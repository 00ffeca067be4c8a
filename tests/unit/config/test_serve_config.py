"""The serve section of the config and what it maps to: engine arguments and Serve deployment options."""
import pytest

from pipeline.config import ConfigError, PipelineConfig
from pipeline.engine.args import NO_MEDIA_DOMAIN, engine_kwargs, serving_engine_kwargs
from pipeline.serve.app import ingress_deployment_config, llm_config_args
from tests.conftest import TINY_CPU_CONFIG


def test_serve_defaults_scale_and_bound_the_queue():
    serve = PipelineConfig.load(environ={}).serve
    assert serve.max_tokens_cap == 4096, "half of the default max_model_len of 8192"
    assert serve.target_ongoing_requests < serve.max_ongoing_requests
    assert serve.max_queued_requests >= 0 and serve.max_images_per_request == 1
    assert serve.host == "127.0.0.1"


def test_serve_defaults_bound_what_one_request_and_one_key_can_take():
    serve = PipelineConfig.load(environ={}).serve
    assert serve.max_n == 1 and serve.max_prompts_per_request == 1, "no fan-out unless configured"
    assert serve.max_json_depth == 64 and serve.max_image_pixels == 24_000_000
    assert serve.image_decode_concurrency == 2
    assert (serve.rate_limit.requests_per_minute, serve.rate_limit.tokens_per_minute) == (600, 200_000)
    assert serve.rate_limit.tokens_per_minute > serve.max_tokens_cap + 8192, "a full-size request fits a key's minute"
    assert serve.key_rate_limits == {}


def test_serving_image_target_is_the_checkpoints(tmp_path):
    import json

    from pipeline.serve.app import serving_image_target

    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 448, "width": 448},
                                                                   "resample": 3}))
    config = PipelineConfig.load(overrides=[f"model.source={tmp_path}"], environ={})
    assert (serving_image_target(config).size_px, serving_image_target(config).resample) == (448, 3)
    (tmp_path / "preprocessor_config.json").unlink()
    assert serving_image_target(config).size_px == 896, "Gemma 3's when the checkpoint has none"
    overridden = PipelineConfig.load(overrides=[f"model.source={tmp_path}", "images.target_size_px=336"], environ={})
    assert serving_image_target(overridden).size_px == 336


@pytest.mark.parametrize("overrides, expected", [
    pytest.param(["serve.max_tokens_cap=8192"], "serve.max_tokens_cap (8192) must be below engine.max_model_len (8192)",
                 id="cap-vs-context"),
    pytest.param(["serve.max_images_per_request=2"], "exceeds engine.max_images_per_prompt (1)", id="images-vs-engine"),
    pytest.param(["serve.min_replicas=3", "serve.max_replicas=2"], "serve.min_replicas (3) exceeds", id="replicas"),
    pytest.param(["serve.ingress_min_replicas=5"], "serve.ingress_min_replicas (5) exceeds", id="ingress-replicas"),
    pytest.param(["serve.target_ongoing_requests=300"], "replicas would never look busy", id="target-vs-max"),
    pytest.param(["serve.allowed_image_domains=[https://images.example.com/]"], "expected bare host names",
                 id="domain-with-scheme"),
    pytest.param(["serve.max_queued_requests=-1"], "serve.max_queued_requests", id="unbounded-queue"),
    pytest.param(["serve.api_key=abc"], "serve.api_key: unknown field; allowed: host,", id="typo"),
    pytest.param(["serve.max_n=0"], "serve.max_n", id="n-zero"),
    pytest.param(["serve.max_json_depth=2"], "serve.max_json_depth", id="depth-too-small"),
    pytest.param(["serve.rate_limit={requests_per_minute: 0}"], "requests_per_minute", id="rpm-zero"),
    pytest.param(["serve.key_rate_limits={ABC: {requests_per_minute: 1}}"], "16 lowercase hex digits",
                 id="key-id-not-hex"),
])
def test_serve_config_errors(overrides, expected):
    with pytest.raises(ConfigError) as info:
        PipelineConfig.load(overrides=overrides, environ={})
    assert expected in str(info.value)


def test_allowed_domains_are_normalised():
    config = PipelineConfig.load(overrides=["serve.allowed_image_domains=[Images.Example.COM., cdn.example.org]"],
                                 environ={})
    assert config.serve.allowed_image_domains == ["images.example.com", "cdn.example.org"]


def test_serving_engine_kwargs_extend_the_shared_ones():
    config = PipelineConfig.load(TINY_CPU_CONFIG, ["engine.chat_template=/t/gemma3-tools.jinja"], environ={})
    shared, online = engine_kwargs(config), serving_engine_kwargs(config)
    assert {k: online[k] for k in shared} == shared, "batch and online share every engine argument"
    # Tools online use the batch job's Gemma 3 parser; engine.chat_template overrides the tool template.
    assert online["enable_auto_tool_choice"] is True and online["tool_call_parser"] == "gemma3"
    assert online["chat_template"] == "/t/gemma3-tools.jinja"
    assert online["override_generation_config"] == {"max_new_tokens": 512}
    assert online["allowed_media_domains"] == [NO_MEDIA_DOMAIN]
    assert online["structured_outputs_config"] == {"backend": "xgrammar", "disable_any_whitespace": True}
    default_template = serving_engine_kwargs(PipelineConfig.load(TINY_CPU_CONFIG, environ={}))["chat_template"]
    assert default_template.endswith("pipeline/templates/gemma3_tools.jinja")


def test_llm_config_args_autoscale_and_bound_the_queue():
    config = PipelineConfig.load(overrides=["serve.min_replicas=2", "serve.max_replicas=6",
                                            "serve.target_ongoing_requests=40", "serve.max_ongoing_requests=128",
                                            "serve.max_queued_requests=64", "engine.accelerator_type=L40S"],
                                 environ={})
    args = llm_config_args(config)
    assert args["deployment_config"] == {
        "autoscaling_config": {"min_replicas": 2, "initial_replicas": 2, "max_replicas": 6,
                               "target_ongoing_requests": 40.0},
        "max_ongoing_requests": 128, "max_queued_requests": 64}
    assert args["model_loading_config"] == {"model_id": "gemma-3-12b-it",
                                            "model_source": "RedHatAI/gemma-3-12b-it-FP8-dynamic"}
    assert args["placement_group_config"]["bundles"] == [{"GPU": 1, "CPU": 1}]  # one GPU per replica (default)
    assert args["accelerator_type"] == "L40S" and "accelerator_config" not in args
    assert ingress_deployment_config(config) == {
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 64.0},
        "ray_actor_options": {"num_cpus": 1.0}}


def test_engine_replicas_warm_up_unless_turned_off():
    from ray.serve.llm import LLMConfig

    from pipeline.serve.warmup import WarmLLMServer, warmup_requests

    args = llm_config_args(PipelineConfig.load(environ={}))
    assert args["server_cls"] == "pipeline.serve.warmup:WarmLLMServer"
    assert LLMConfig(**args).server_cls is WarmLLMServer  # Ray resolves the path itself
    # Off: the plugins still load before Ray's server looks up the tool parser, only the requests go.
    assert (llm_config_args(PipelineConfig.load(overrides=["serve.warmup=false"], environ={}))["server_cls"]
            == "pipeline.serve.warmup:PluginLLMServer")
    image, tool = warmup_requests("gemma-3-12b-it", with_tools=True)
    content = image[1]["messages"][0]["content"]
    assert content[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert tool[1]["tool_choice"] == "required" and tool[1]["tools"][0]["function"]["name"] == "get_weather"
    assert [name for name, _ in warmup_requests("m", with_tools=False)] == ["image"]


def test_llm_config_args_cpu_and_s3():
    config = PipelineConfig.load(TINY_CPU_CONFIG, ["model.source=s3://models/gemma-3-12b-it-fp8",
                                                   "serve.min_replicas=0"], environ={})
    args = llm_config_args(config)
    assert args["accelerator_config"] == {"kind": "cpu"}
    assert args["placement_group_config"]["bundles"] == [{"CPU": 1}]
    assert args["model_loading_config"]["model_source"] == {"bucket_uri": "s3://models/gemma-3-12b-it-fp8"}
    autoscaling = args["deployment_config"]["autoscaling_config"]
    assert (autoscaling["min_replicas"], autoscaling["initial_replicas"]) == (0, 1)
    assert args["runtime_env"] == {"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}}


@pytest.mark.parametrize("name", ["serve-tiny-cpu.yaml", "serve.yaml"])
def test_serve_config_files(name):
    """The `serve run` / `serve deploy` files are valid Serve configs whose args load our config."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from tests.conftest import ROOT

    schema = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "configs" / name).read_text()))
    (app,) = schema.applications
    assert app.import_path == "pipeline.serve:app_builder" and app.route_prefix == "/"
    assert set(app.args) == {"config", "set"}
    config = PipelineConfig.load(ROOT / app.args["config"], app.args["set"], environ={})
    assert config.model.served_name == "gemma-3-12b-it"
    assert config.serve.target_ongoing_requests < config.serve.max_ongoing_requests
