"""The dry run: what a caption job would do, printed before anything expensive starts.

`plan_run` checks the model (config.json, scheme, weight sizes), the input (schema, row count, duplicate
ids: the same `plan_input` the job uses) and the output prefix, then `build_plan` lays out the stages,
their replicas and placement, and the memory each engine replica should need. No vLLM engine starts and
no GPU is taken; the input scan reads the id column in the driver for small inputs, and runs on Ray's
CPU workers for large ones (an embedded local Ray unless a cluster is configured).

Memory per GPU is an estimate from the config and the checkpoint, with the formula stated:
- weights: the safetensors bytes split over tensor x pipeline parallel ranks;
- what vLLM reserves: gpu_memory_utilization x the card's memory, so the KV cache (and activations)
  get the rest; on CPU the KV cache is engine.kv_cache_memory_bytes;
- KV bytes per sequence of max_model_len: 2 (K, V) x kv_heads x head_dim x dtype bytes, over full-attention
  layers for every token and sliding-window layers for at most their window.

The CPU budget (`cpu_budget`) checks that the CPUs left beside the engines can prepare images as fast as
the engines caption them: batch.prepare_cpu_s_per_image x batch.engine_images_per_s x headroom per GPU
(both measured by `python -m bench.prepare_cost`, docs/batch.md: CPU per GPU), against the cluster's CPUs
per GPU (Ray's resources, or cluster.yaml's GPU node type while an autoscaling cluster has no GPU node).
"""
from __future__ import annotations

import json
import logging
import math
from typing import Any, Optional

import pyarrow.fs as pafs

from pipeline.engine.checkpoint import checkpoint_weight_bytes, read_checkpoint_file
from pipeline.config import PipelineConfig
from pipeline.engine.args import engine_kwargs, fixed_or_range, gpus_per_replica, placement_group, workers_per_replica

logger = logging.getLogger(__name__)

GIB = 2**30
# Usable memory of common cards (MiB, as nvidia-smi reports it), keyed by Ray's accelerator type names.
CARD_MIB = {"H200": 143771, "H100": 81559, "A100-80G": 81920, "A100-40G": 40960, "L40S": 46068,
            "L4": 23034, "A10G": 23028}
EXAMPLE_CARDS = ("H100", "L40S", "L4")
# CPU budget: Ray Data's own work between stages (serialisation, scheduling, GC) is not in the measured
# per-image costs, and a pool below its need lets the engines starve; 1.5x covers both.
CPU_HEADROOM = 1.5
# vLLM's per-request work in the engine actor's process (multimodal processor with our uint8 variant,
# request encoding), measured by bench.prepare_cost: the same for any input size, since the pixels arrive
# at 896 px. It is one process per replica, so it caps a replica whatever the CPU count.
FRONTEND_CPU_S_PER_IMAGE = 0.010


def kv_bytes_per_sequence(model_config: dict[str, Any], max_model_len: int, dtype_bytes: int) -> Optional[int]:
    """KV-cache bytes of one sequence of `max_model_len` tokens, from the checkpoint's config.json."""
    text = model_config.get("text_config") or model_config
    try:
        layers = int(text["num_hidden_layers"])
        per_token_layer = 2 * int(text["num_key_value_heads"]) * int(text["head_dim"]) * dtype_bytes
    except (KeyError, TypeError, ValueError):
        return None
    types = text.get("layer_types") or ["full_attention"] * layers
    window = text.get("sliding_window") or max_model_len
    tokens = sum(min(max_model_len, window) if t == "sliding_attention" else max_model_len for t in types)
    return per_token_layer * tokens


def memory_estimate(config: PipelineConfig, weights_bytes: Optional[int],
                    model_config: dict[str, Any]) -> dict[str, Any]:
    engine = config.engine
    ranks = workers_per_replica(config)
    dtype_bytes = 1 if engine.kv_cache_dtype.startswith("fp8") else 2
    per_seq = kv_bytes_per_sequence(model_config, engine.max_model_len, dtype_bytes)
    weights_per_rank = weights_bytes / ranks if weights_bytes else None
    estimate: dict[str, Any] = {
        "weights_bytes": weights_bytes, "weights_per_rank_bytes": weights_per_rank,
        "ranks_per_replica": ranks, "kv_bytes_per_full_sequence": per_seq,
        "kv_bytes_for_max_num_seqs": per_seq * engine.max_num_seqs if per_seq else None,
        "cards": {},
    }
    if engine.device == "cpu":
        kv = engine.kv_cache_memory_bytes or 0
        estimate["cpu_ram_per_replica_bytes"] = (weights_bytes or 0) + kv
        estimate["kv_budget_per_rank_bytes"] = kv / ranks
        estimate["formula"] = ("RAM per replica ~ weights + engine.kv_cache_memory_bytes (+ activations and "
                               "the engine's own ~2-3 GiB of process memory)")
        return estimate
    cards = [engine.accelerator_type] if engine.accelerator_type in CARD_MIB else list(EXAMPLE_CARDS)
    for card in cards:
        reserved = engine.gpu_memory_utilization * CARD_MIB[card] * 2**20
        kv_budget = reserved - weights_per_rank if weights_per_rank is not None else None
        per_seq_rank = per_seq / ranks if per_seq else None  # TP shards the KV heads (PP the layers)
        estimate["cards"][card] = {
            "card_bytes": CARD_MIB[card] * 2**20, "reserved_per_gpu_bytes": reserved,
            "kv_and_activations_per_gpu_bytes": kv_budget,
            "full_sequences_that_fit": int(kv_budget // per_seq_rank) if kv_budget and per_seq_rank else None,
        }
    estimate["formula"] = ("per GPU: vLLM reserves gpu_memory_utilization x card memory; weights take "
                           "weights / (tensor x pipeline ranks); the KV cache and activations get the rest")
    return estimate


def output_state(fs: pafs.FileSystem, path: str, overwrite: bool, in_use_by: Optional[str] = None) -> str:
    """What the output prefix holds and what the run would do with it; `in_use_by` names a live job that
    holds the prefix's writer lease (the run would be refused, whatever it holds)."""
    from pipeline.batch.resume import output_entries

    if in_use_by:
        return f"in use by another job ({in_use_by}): the run would be refused (exit 4)"
    entries = output_entries(fs, path)
    if not entries:
        return "empty: the run writes here"
    finished = any(e.base_name == "_manifest.json" for e in entries)
    held = "a finished run" if finished else "files from an earlier run"
    if overwrite:
        return f"holds {held} ({len(entries)} entries): --overwrite replaces it"
    return f"holds {held} ({len(entries)} entries): the run refuses it without --overwrite"


def lease_holder(config: PipelineConfig, output_uri: str) -> Optional[str]:
    """The live job holding the output's writer lease, described, or None (read only: takes nothing)."""
    from pipeline.batch.output_lease import OutputLease, describe

    lease = OutputLease.for_output(config.storage, output_uri, ttl_s=config.batch.output_lease_ttl_s)
    current = lease.holder()
    if current is None or lease.is_stale(current[1]):
        return None
    return describe(current[1], lease.clock())


def cpu_budget(config: PipelineConfig, cpus: Optional[float], gpus: Optional[float], source: str) -> dict[str, Any]:
    """Whether `cpus` beside `gpus` (a cluster's, or one node type's) can feed the engines, with warnings
    that say what to change. Per GPU: needed = prepare_cpu_s_per_image x engine_images_per_s x headroom;
    available = (CPUs - the engines' own placement-group CPUs) / GPUs the engines use."""
    batch, engine = config.batch, config.engine
    budget: dict[str, Any] = {"source": source, "checked": False, "warnings": [],
                              "cpu_s_per_image": batch.prepare_cpu_s_per_image,
                              "images_per_s_per_gpu": batch.engine_images_per_s, "headroom": CPU_HEADROOM}
    if engine.device != "gpu":
        budget["reason"] = "CPU engine: not checked"
        return budget
    gpus_each = gpus_per_replica(config)
    _, high = fixed_or_range(batch.engine_replicas)
    needed_per_gpu = batch.prepare_cpu_s_per_image * batch.engine_images_per_s * CPU_HEADROOM
    budget["needed_cpus_per_gpu"] = needed_per_gpu
    # The engine actor's front-end: one process per replica, whatever CPUs the node has.
    frontend_load = FRONTEND_CPU_S_PER_IMAGE * batch.engine_images_per_s * gpus_each
    budget["frontend_core_load"] = frontend_load
    if frontend_load >= 1.0:
        budget["warnings"].append(
            f"the engine actor's front-end (one process per replica) would need {frontend_load:.2f} cores at "
            f"{batch.engine_images_per_s:g} images/s x {gpus_each:g} GPU(s) per replica: it caps each replica "
            f"at ~{1 / FRONTEND_CPU_S_PER_IMAGE:.0f} images/s whatever the CPU count; run more replicas of "
            "fewer GPUs each (engine.tensor_parallel_size)")
    # The preparation pools: every PrepareRecords actor is one process, so at most about one core each.
    _, prepare_high = fixed_or_range(batch.prepare_replicas)
    needed_at_max = needed_per_gpu * gpus_each * high
    budget["needed_cpus_at_max_replicas"] = needed_at_max
    if prepare_high < needed_at_max:
        budget["warnings"].append(
            f"batch.prepare_replicas allows at most {prepare_high} preparation workers (about one core each) "
            f"but {high} engine replica(s) need ~{needed_at_max:.1f} cores of preparation: raise "
            f"batch.prepare_replicas to [.., {math.ceil(needed_at_max)}] or more")
    if not cpus or not gpus or gpus <= 0:
        budget["reason"] = "no GPU in the cluster's resources: CPUs per GPU not checked"
        return budget
    used_gpus = min(gpus_each * high, gpus)
    engine_cpus = sum(b.get("CPU", 0) for b in placement_group(config)["bundles"]) * used_gpus / gpus_each
    available_per_gpu = max(cpus - engine_cpus, 0.0) / used_gpus
    budget.update(checked=True, cpus=cpus, gpus=gpus, engine_gpus=used_gpus, engine_cpus=engine_cpus,
                  available_cpus_per_gpu=available_per_gpu)
    if available_per_gpu < needed_per_gpu:
        # Each GPU in use takes its engine's bundle CPUs and its preparation share: these CPUs feed this many.
        fed = int(cpus // (engine_cpus / used_gpus + needed_per_gpu))
        budget["warnings"].append(
            f"{source} leaves {available_per_gpu:.1f} CPUs per GPU for preparation ({cpus:g} CPUs - {engine_cpus:g} "
            f"for the engines, over {used_gpus:g} GPUs) but the engines need ~{needed_per_gpu:.1f} "
            f"({batch.prepare_cpu_s_per_image * 1e3:.1f} ms CPU per image x {batch.engine_images_per_s:g} "
            f"images/s x {CPU_HEADROOM:g} headroom): the GPUs will wait on the CPUs. Use nodes with more CPUs "
            f"per GPU, or fewer engine replicas ({cpus:g} CPUs feed ~{fed} GPU(s): batch.engine_replicas); "
            "batch.prepare_cpu_s_per_image is the workload's cost (bench.prepare_cost)")
    return budget


def cluster_yaml_gpu_node(path: str = "cluster.yaml") -> Optional[tuple[float, float, str]]:
    """(CPUs, GPUs, name) of the first GPU node type in a Ray cluster launcher file, or None."""
    import yaml

    try:
        with open(path) as handle:
            types = (yaml.safe_load(handle) or {}).get("available_node_types") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    for name, node in types.items():
        resources = (node or {}).get("resources") or {}
        if resources.get("GPU") and resources.get("CPU"):
            return float(resources["CPU"]), float(resources["GPU"]), name
    return None


def cluster_resources(config: PipelineConfig) -> tuple[Optional[float], Optional[float], str]:
    """CPUs and GPUs the engines and preparation share: the joined Ray cluster's; while it has no GPU (an
    autoscaling cluster at zero workers, a laptop) one GPU node of cluster.yaml, when there is one."""
    import ray

    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU"), resources.get("GPU")
    if gpus or config.engine.device != "gpu":
        return cpus, gpus, "the Ray cluster"
    node = cluster_yaml_gpu_node()
    if node is not None:
        return node[0], node[1], f"cluster.yaml's GPU node type {node[2]}"
    return cpus, gpus, "the Ray cluster"


def build_plan(config: PipelineConfig, *, input_plan: Any, model_plan: Any, output_uri: str, output: str,
               weights_bytes: Optional[int], model_config: dict[str, Any],
               cluster: Optional[tuple[Optional[float], Optional[float], str]] = None) -> dict[str, Any]:
    """The plan as a dict: input, model, output, stages with replicas and placement, memory."""
    batch, engine = config.batch, config.engine
    low, high = fixed_or_range(batch.engine_replicas)
    prepare = fixed_or_range(batch.prepare_replicas)
    placement = placement_group(config)
    gpus_each = gpus_per_replica(config)
    stages = [
        {"stage": "read parquet", "runs_as": "Ray Data read tasks", "replicas": "per file block",
         "resources": "1 CPU per task"},
        {"stage": "PrepareRecords (validate, fetch, decode, resize)", "runs_as": "actor pool",
         "replicas": _range(prepare), "resources": f"{batch.prepare_num_cpus:g} CPU each",
         "batch_size": batch.prepare_batch_size},
        *({"stage": f"ray.data.llm {name}", "runs_as": "actor pool", "replicas": _range(prepare),
           "resources": "1 CPU each"} for name in ("prepare multimodal", "chat template", "tokenize")),
        {"stage": "ray.data.llm vLLM engine", "runs_as": "actor pool, one placement group per replica",
         "replicas": _range((low, high)), "batch_size": batch.engine_batch_size,
         "max_concurrent_batches": batch.max_concurrent_batches,
         "resources": f"{len(placement['bundles'])} bundle(s) of {placement['bundles'][0]} "
                      f"({placement['strategy']})" + (f", accelerator {engine.accelerator_type}"
                                                       if engine.accelerator_type else "")},
        {"stage": "FinalizeRows + tally (status line, metrics)", "runs_as": "tasks (fused)",
         "replicas": "per block", "resources": "1 CPU per task"},
        {"stage": "write parquet", "runs_as": "tasks", "replicas": "per block",
         "resources": f"files of at most {batch.rows_per_file:,} rows, at least "
                      f"{math.ceil(input_plan.num_rows / batch.rows_per_file) if input_plan.num_rows else 0} files"},
    ]
    return {
        "input": {"uri": input_plan.uri, "rows": input_plan.num_rows, "duplicate_ids": len(input_plan.duplicate_ids),
                  "rows_without_id": input_plan.missing_ids, "columns": input_plan.schema.names},
        "model": {**model_plan.checkpoint.as_dict(), "image_size_px": model_plan.image_target.size_px,
                  "stop_token_ids": model_plan.stop_token_ids},
        "output": {"uri": output_uri, "state": output},
        "engine": {"device": engine.device, "replicas": [low, high], "gpus_per_replica": gpus_each,
                   "gpus_at_most": gpus_each * high, "placement_group": placement,
                   "engine_kwargs": engine_kwargs(config)},
        "stages": stages,
        "memory": memory_estimate(config, weights_bytes, model_config),
        "cpu_budget": cpu_budget(config, *(cluster or (None, None, "no cluster"))),
    }


def plan_run(config: PipelineConfig, input_uri: str, output_uri: str, *, overwrite: bool = False) -> dict[str, Any]:
    """Inspect model, input and output as the job would, and return the plan (no engine, no GPU)."""
    from pipeline.batch.caption import plan_input, plan_model
    from pipeline.batch.resume import check_output_apart
    from pipeline.ops.runtime import init_ray
    from pipeline.io.storage import make_filesystem

    config = config.with_absolute_paths()
    check_output_apart(input_uri, output_uri)
    model_plan = plan_model(config)
    raw = read_checkpoint_file(config.model.source, "config.json", config.storage)
    model_config = json.loads(raw) if raw else {}
    weights = checkpoint_weight_bytes(config.model.source, config.storage)
    fs, path = make_filesystem(config.storage, output_uri)
    state = output_state(fs, path, overwrite, lease_holder(config, output_uri))
    init_ray(config)
    input_plan = plan_input(config, input_uri)
    return build_plan(config, input_plan=input_plan, model_plan=model_plan, output_uri=output_uri,
                      output=state, weights_bytes=weights, model_config=model_config,
                      cluster=cluster_resources(config))


def _range(value: tuple[int, int]) -> str:
    return str(value[0]) if value[0] == value[1] else f"{value[0]}..{value[1]} (autoscaling)"


def _gib(value: Optional[float]) -> str:
    """Bytes in the largest binary unit that keeps them above 1 (GiB for a 12B model, KiB for a toy)."""
    if value is None:
        return "unknown"
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:,.2f} {unit}"
    return f"{value:,.0f} B"


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as text for a terminal."""
    i, m, o, e, mem = plan["input"], plan["model"], plan["output"], plan["engine"], plan["memory"]
    lines = [
        "DRY RUN: nothing was started on an engine or a GPU.",
        f"input   {i['uri']}: {i['rows']:,} rows, {i['duplicate_ids']:,} duplicated ids (every occurrence "
        f"becomes an error row), {i['rows_without_id']:,} rows without id",
        f"model   {m['source']}: {m.get('architecture')}, scheme {m['scheme']}, images {m['image_size_px']}px, "
        f"weights {_gib(mem['weights_bytes'])}",
        f"output  {o['uri']}: {o['state']}",
        f"engine  {e['device']}: replicas {_range(tuple(e['replicas']))}, "
        + (f"{e['gpus_per_replica']:g} GPU(s) per replica, {e['gpus_at_most']:g} GPU(s) at most"
           if e["device"] == "gpu" else "no GPU (CPU engine)")
        + f"; placement per replica {json.dumps(e['placement_group'])}",
        "",
        "stages:",
    ]
    for s in plan["stages"]:
        extra = "".join(f", {k} {s[k]}" for k in ("batch_size", "max_concurrent_batches") if k in s)
        lines.append(f"  - {s['stage']}: {s['runs_as']}, replicas {s['replicas']}, {s['resources']}{extra}")
    lines += ["", "expected memory per engine replica:",
              f"  weights {_gib(mem['weights_bytes'])} over {mem['ranks_per_replica']} rank(s): "
              f"{_gib(mem['weights_per_rank_bytes'])} per rank",
              f"  KV cache of one {plan['engine']['engine_kwargs']['max_model_len']}-token sequence "
              f"{_gib(mem['kv_bytes_per_full_sequence'])}; max_num_seqs of them "
              f"{_gib(mem['kv_bytes_for_max_num_seqs'])}"]
    if "cpu_ram_per_replica_bytes" in mem:
        lines.append(f"  RAM {_gib(mem['cpu_ram_per_replica_bytes'])} (weights + KV cache)")
    for card, c in mem["cards"].items():
        fits = c["full_sequences_that_fit"]
        lines.append(f"  on {card} ({_gib(c['card_bytes'])}): vLLM reserves {_gib(c['reserved_per_gpu_bytes'])} "
                     f"per GPU ({_gib(c['reserved_per_gpu_bytes'] * mem['ranks_per_replica'])} per replica); "
                     f"KV cache + activations {_gib(c['kv_and_activations_per_gpu_bytes'])} per GPU"
                     + (f" (~{fits:,} full-length sequences per replica)" if fits is not None else ""))
    lines += [f"  ({mem['formula']})", ""]
    lines += format_cpu_budget(plan.get("cpu_budget"))
    lines += ["", "engine arguments: " + json.dumps(e["engine_kwargs"], sort_keys=True)]
    return "\n".join(lines)


def format_cpu_budget(budget: Optional[dict[str, Any]]) -> list[str]:
    if not budget:
        return []
    lines = ["CPU budget:"]
    if "needed_cpus_per_gpu" in budget:
        lines.append(f"  needed ~{budget['needed_cpus_per_gpu']:.1f} CPUs per GPU for preparation "
                     f"({budget['cpu_s_per_image'] * 1e3:.1f} ms CPU per image, batch.prepare_cpu_s_per_image, x "
                     f"{budget['images_per_s_per_gpu']:g} images/s per GPU, batch.engine_images_per_s, x "
                     f"{budget['headroom']:g} headroom); the engine front-end ~{budget['frontend_core_load']:.2f} "
                     "of one core per replica")
    if budget["checked"]:
        lines.append(f"  available {budget['available_cpus_per_gpu']:.1f} CPUs per GPU on {budget['source']} "
                     f"({budget['cpus']:g} CPUs, {budget['engine_cpus']:g} of them for the engines, "
                     f"{budget['engine_gpus']:g} GPUs used)" + ("" if budget["warnings"] else ": enough"))
    else:
        lines.append(f"  {budget['reason']}")
    lines += [f"WARNING: {w}" for w in budget["warnings"]]
    return lines
