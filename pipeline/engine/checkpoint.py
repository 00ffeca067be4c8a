"""Read a checkpoint's small config files and tell its quantization scheme, before any GPU is taken.

A job that would load the wrong checkpoint (bf16 where FP8 was meant, or an FP8 one whose vision tower
was quantized, which gives NaN image logits: docs/notes.md: FP8-dynamic with llm-compressor) fails here, on the driver, with a message that
says what the checkpoint holds.
"""
from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

from pipeline.engine.checkpoint_layout import INDEX_NAME, check_tensor_names, read_local_names, safetensors_header_names
from pipeline.config import StorageSection
from pipeline.io.storage import is_s3, make_s3_client, split_s3

logger = logging.getLogger(__name__)

# Linear modules that must stay bf16 in Gemma 3: a quantized vision tower breaks image understanding
# (NaN image logits, docs/notes.md: FP8-dynamic with llm-compressor); an untied lm_head costs accuracy for little memory. (The multimodal
# projector's weight is a bare Parameter in both loaders, never a quantization target.) Each is probed
# under the names vLLM matches the ignore list against (the checkpoint's Google layout, which vLLM's
# Gemma 3 module names follow) and under the names transformers >= 5 gives the modules on reload.
# llm-compressor writes exact names in the checkpoint layout (its oneshot expands regex ignores to them),
# which transformers does not match: it then quantizes the vision tower on reload. Regexes such as
# `re:.*vision_tower.*` match both.
KEEP_BF16_PROBES: dict[str, dict[str, tuple[str, ...]]] = {
    "vision tower": {
        "vllm": ("vision_tower.vision_model.encoder.layers.0.self_attn.q_proj",),
        "transformers": ("model.vision_tower.encoder.layers.0.self_attn.q_proj",),
    },
    "lm_head": {"vllm": ("language_model.lm_head", "lm_head"), "transformers": ("lm_head",)},
}


GEMMA3_ARCHITECTURE = "Gemma3ForConditionalGeneration"


class CheckpointError(ValueError):
    """The checkpoint cannot be used as configured."""


@dataclass
class CheckpointInfo:
    source: str
    scheme: str                      # "fp8-dynamic", "none", or another method's name
    architecture: Optional[str]
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "scheme": self.scheme, "architecture": self.architecture,
                **self.details}


def read_checkpoint_file(source: str, name: str, storage: StorageSection) -> Optional[bytes]:
    """One small file of a checkpoint from a local dir, an s3:// prefix or the Hugging Face hub."""
    if is_s3(source):
        from botocore.exceptions import ClientError

        bucket, prefix = split_s3(source.rstrip("/") + "/" + name)
        try:
            return make_s3_client(storage).get_object(Bucket=bucket, Key=prefix)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
    local = Path(source)
    if local.is_dir():
        path = local / name
        return path.read_bytes() if path.is_file() else None
    return _read_hub_file(source, name)


def _read_hub_file(source: str, name: str) -> Optional[bytes]:
    """One file of a Hugging Face hub repository (from the local cache when it is there); None when the
    repository has no such file. Every other failure is one CheckpointError saying what failed:
    unreachable, gated, not found or not authorised, without huggingface_hub's retry messages."""
    try:
        from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
        from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                            RemoteEntryNotFoundError, RepositoryNotFoundError,
                                            RevisionNotFoundError)
    except ImportError as exc:  # huggingface_hub always comes with vLLM; this is for lean installs
        raise CheckpointError(f"{source} is neither a local directory nor s3://, and huggingface_hub "
                              "is not installed to fetch it") from exc
    unreachable = (f"cannot reach the Hugging Face hub ({constants.ENDPOINT}) to read {source}, and its {name} "
                   f"is not in the local cache; download it where the hub is reachable (`hf download {source} "
                   "--local-dir DIR`) and pass DIR, or an s3:// copy, as the model")
    if not constants.is_offline_mode() and not _resolves(constants.ENDPOINT):
        # No DNS answer: huggingface_hub would retry for ~25 s before saying the same.
        cached = try_to_load_from_cache(source, name)
        if isinstance(cached, str):
            return Path(cached).read_bytes()
        raise CheckpointError(unreachable)
    try:
        with _quiet(_HUB_RETRY_LOGGER):
            return Path(hf_hub_download(source, name)).read_bytes()
    except RemoteEntryNotFoundError:
        return None
    except GatedRepoError:
        raise CheckpointError(f"{source} is gated on the Hugging Face hub: accept its terms on the model page "
                              "with your account, then give a token of that account (HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{source} was not found on the Hugging Face hub, or it is private and no token "
                              "with access was given (HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{source}: the revision asked for does not exist on the Hugging Face hub") from None
    except (LocalEntryNotFoundError, HfHubHTTPError) as exc:
        # huggingface_hub reports a refused HEAD request as "not in the cache", caused by the HTTP error.
        http_error = exc if isinstance(exc, HfHubHTTPError) else exc.__cause__
        status = getattr(getattr(http_error, "response", None), "status_code", None)
        if status is None:
            if constants.is_offline_mode():
                raise CheckpointError(f"HF_HUB_OFFLINE is set and {name} of {source} is not in the local Hugging "
                                      "Face cache; pass a local directory or an s3:// prefix as the model") from None
            raise CheckpointError(unreachable) from None
        if status in (401, 403):
            raise CheckpointError(f"the Hugging Face hub refused {source} (HTTP {status}): the token (HF_TOKEN) "
                                  "is missing, wrong, or has no access") from None
        raise CheckpointError(f"the Hugging Face hub failed reading {name} of {source}: HTTP {status}") from None


# huggingface_hub logs a warning per retry ("Retrying in 8s [Retry 4/5]"); the outcome is reported once.
_HUB_RETRY_LOGGER = "huggingface_hub.utils._http"


@contextlib.contextmanager
def _quiet(logger_name: str):
    quieted = logging.getLogger(logger_name)
    level = quieted.level
    quieted.setLevel(logging.ERROR)
    try:
        yield
    finally:
        quieted.setLevel(level)


def _resolves(endpoint: str) -> bool:
    host = urlsplit(endpoint).hostname
    try:
        socket.getaddrinfo(host, None)
        return True
    except (socket.gaierror, UnicodeError):
        return False


def inspect_checkpoint(source: str, storage: StorageSection) -> CheckpointInfo:
    raw = read_checkpoint_file(source, "config.json", storage)
    if raw is None:
        raise CheckpointError(f"{source}: no config.json; is this a Hugging Face checkpoint directory?")
    config = json.loads(raw)
    architectures = config.get("architectures") or [None]
    quant = config.get("quantization_config")
    if not quant:
        return CheckpointInfo(source, "none", architectures[0], {"dtype": config.get("torch_dtype") or config.get("dtype")})
    method = quant.get("quant_method", "unknown")
    if method != "compressed-tensors":
        return CheckpointInfo(source, method, architectures[0], {"quant_method": method})
    return CheckpointInfo(source, _compressed_tensors_scheme(source, quant), architectures[0],
                          {"quant_method": method, "ignore": quant.get("ignore", []),
                           "format": quant.get("format"), "lm_head_tied": _lm_head_tied(config)})


def _lm_head_tied(config: dict[str, Any]) -> bool:
    """Whether lm_head shares the embedding matrix (Gemma 3's default, and every published size)."""
    text = config.get("text_config") or {}
    return bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", True)))


def _compressed_tensors_scheme(source: str, quant: dict[str, Any]) -> str:
    groups = quant.get("config_groups") or {}
    schemes = set()
    for group in groups.values():
        weights = group.get("weights") or {}
        inputs = group.get("input_activations") or {}
        fp8_weights = (weights.get("type") == "float" and weights.get("num_bits") == 8
                       and weights.get("strategy") == "channel" and weights.get("symmetric", True)
                       and not weights.get("dynamic", False))
        fp8_dynamic_inputs = (inputs.get("type") == "float" and inputs.get("num_bits") == 8
                              and inputs.get("strategy") == "token" and inputs.get("dynamic") is True)
        if fp8_weights and fp8_dynamic_inputs:
            schemes.add("fp8-dynamic")
        else:
            schemes.add("compressed-tensors:" + "/".join(
                str(x) for x in (weights.get("type"), weights.get("num_bits"), weights.get("strategy"),
                                 inputs.get("strategy") if inputs else "weight-only")))
    if len(schemes) != 1:
        return "compressed-tensors:mixed" if schemes else "compressed-tensors:empty"
    return schemes.pop()


def is_ignored(module: str, ignore: list[str]) -> bool:
    """compressed-tensors' (and vLLM's) ignore semantics: `re:` entries are `re.match`ed against the module
    name, any other entry must equal it."""
    for entry in ignore:
        if entry.startswith("re:"):
            if re.match(entry[3:], module):
                return True
        elif module == entry:
            return True
    return False


def quantized_kept_modules(ignore: list[str], loader: str, lm_head_tied: bool = False) -> list[str]:
    """Labels of the modules that must stay bf16 but that `loader` ("vllm" or "transformers") would quantize.

    A module counts as kept when any of its names under that loader is ignored. A tied lm_head is the
    embedding matrix, which neither loader quantizes, so it is kept whatever the ignore list says.
    """
    return [label for label, names in KEEP_BF16_PROBES.items()
            if not (label == "lm_head" and lm_head_tied)
            and not any(is_ignored(name, ignore) for name in names[loader])]


def check_checkpoint(info: CheckpointInfo, expected: str) -> None:
    """Raise CheckpointError unless the checkpoint carries the scheme the config asks for."""
    if expected != "any" and info.scheme != expected:
        raise CheckpointError(
            f"{info.source} holds scheme {info.scheme!r} but model.quantization is {expected!r}; "
            "point model.source at the right checkpoint or set model.quantization "
            "(fp8-dynamic, none, any)")
    if info.scheme == "fp8-dynamic":
        ignore = info.details.get("ignore", [])
        tied = bool(info.details.get("lm_head_tied"))
        quantized = quantized_kept_modules(ignore, "vllm", tied)
        if quantized:
            raise CheckpointError(
                f"{info.source} quantizes the {', '.join(quantized)} (ignore list: {ignore}); Gemma 3 "
                "needs them in bf16 (a quantized vision tower gives NaN image logits). Requantize with "
                "jobs.quantize, which ignores them by regex.")
        if quantized_kept_modules(ignore, "transformers", tied):
            logger.warning("%s: fine for vLLM, but its ignore list misses transformers' module names, so "
                           "transformers would quantize the vision tower on reload (NaN image logits); "
                           "requantize with jobs.quantize to use it outside vLLM", info.source)


def checkpoint_weight_bytes(source: str, storage: StorageSection) -> Optional[int]:
    """Bytes of the checkpoint's safetensors weights, without downloading them; None when unknown.

    A sharded checkpoint's `model.safetensors.index.json` states the total; otherwise the files are
    sized by listing (local directory, s3:// prefix) or by the hub's file metadata.
    """
    index = read_checkpoint_file(source, INDEX_NAME, storage)
    if index is not None:
        total = (json.loads(index).get("metadata") or {}).get("total_size")
        if isinstance(total, int):
            return total
    if is_s3(source):
        bucket, prefix = split_s3(source.rstrip("/") + "/")
        pages = make_s3_client(storage).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        sizes = [o["Size"] for page in pages for o in page.get("Contents", []) if o["Key"].endswith(".safetensors")]
        return sum(sizes) if sizes else None
    local = Path(source)
    if local.is_dir():
        sizes = [p.stat().st_size for p in local.glob("*.safetensors")]
        return sum(sizes) if sizes else None
    try:
        from huggingface_hub import HfApi

        infos = HfApi().get_paths_info(source, ["model.safetensors"])
        return sum(i.size for i in infos if getattr(i, "size", None)) or None
    except Exception as exc:  # the size only feeds an estimate; the dry run says it is unknown
        logger.warning("cannot size the weights of %s: %s", source, exc)
        return None


def checkpoint_tensor_names(source: str, storage: StorageSection) -> Optional[list[str]]:
    """Every tensor name of a checkpoint without reading a tensor: from the safetensors index, else from
    the shards' headers (local, or ranged S3 reads), else from the hub's safetensors metadata. None
    when the checkpoint has no safetensors."""
    index = read_checkpoint_file(source, INDEX_NAME, storage)
    if index is not None:
        return list(json.loads(index)["weight_map"])
    if is_s3(source):
        client = make_s3_client(storage)
        bucket, prefix = split_s3(source.rstrip("/") + "/")
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
        keys = sorted(o["Key"] for page in pages for o in page.get("Contents", []) if o["Key"].endswith(".safetensors"))
        names: list[str] = []
        for key in keys:
            (length,) = struct.unpack("<Q", client.get_object(Bucket=bucket, Key=key, Range="bytes=0-7")["Body"].read())
            header = client.get_object(Bucket=bucket, Key=key, Range=f"bytes=8-{7 + length}")["Body"].read()
            names += safetensors_header_names(header)
        return names or None
    if Path(source).is_dir():
        return read_local_names(Path(source)) or None
    from huggingface_hub import HfApi

    with _quiet(_HUB_RETRY_LOGGER):
        return list(HfApi().get_safetensors_metadata(source).weight_map) or None


def check_loadable(info: CheckpointInfo, storage: StorageSection, *, maps_transformers_siglip: bool) -> None:
    """Raise CheckpointError, in one line, when vLLM's Gemma 3 would fail to load the checkpoint's tensors
    (SigLIP layout, a tensor lost from a layer): found from the headers on the driver, before any engine
    takes a GPU. Other architectures are left to the engine."""
    if info.architecture != GEMMA3_ARCHITECTURE:
        return
    names = checkpoint_tensor_names(info.source, storage)
    if names is None:  # other weight formats (.bin) are left to the engine
        logger.info("%s: no safetensors headers to check the tensor names against", info.source)
        return
    config = json.loads(read_checkpoint_file(info.source, "config.json", storage) or b"{}")
    problems = check_tensor_names(names, config, maps_transformers_siglip=maps_transformers_siglip)
    if problems:
        raise CheckpointError(f"{info.source} cannot be loaded by vLLM's Gemma 3: {'; '.join(problems)}")
