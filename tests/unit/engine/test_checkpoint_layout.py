"""Tensor names of Gemma 3 checkpoints in both SigLIP layouts: the driver's check, the rewrite that
jobs.quantize applies, and the mirror of vLLM's name mapping, on real checkpoints built here."""
import json
import shutil
import subprocess
import sys
import textwrap

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.engine.checkpoint import CheckpointError, check_loadable, checkpoint_tensor_names, inspect_checkpoint
from pipeline.engine.checkpoint_layout import (VLLM_GEMMA3_PREFIXES, check_tensor_names, has_transformers_siglip,
                                        read_local_names, to_google_layout, to_google_name, vllm_loaded_name)
from pipeline.config import StorageSection


def names_of(directory):
    names = []
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as handle:
            names += list(handle.keys())
    return names


def config_of(directory):
    return json.loads((directory / "config.json").read_text())


def test_the_two_layouts_differ_only_in_siglip(tiny_model, tiny_model_transformers_layout):
    google, transformers = names_of(tiny_model), names_of(tiny_model_transformers_layout)
    assert not has_transformers_siglip(google) and has_transformers_siglip(transformers)
    assert "vision_tower.embeddings.patch_embedding.weight" in transformers
    assert "vision_tower.vision_model.embeddings.patch_embedding.weight" in google
    assert all(to_google_name(n) == n for n in google)
    assert to_google_name("model.vision_tower.encoder.layers.0.mlp.fc1.weight") == \
        "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"


def test_mirror_of_vllms_mapping_matches_vllm():
    from vllm.model_executor.models.gemma3_mm import Gemma3ForConditionalGeneration

    mapper = Gemma3ForConditionalGeneration.hf_to_vllm_mapper
    samples = [old + "x.weight" for old in VLLM_GEMMA3_PREFIXES] + [
        "language_model.model.layers.0.mlp.up_proj.weight", "vision_tower.vision_model.post_layernorm.weight",
        "multi_modal_projector.mm_input_projection_weight", "vision_tower.embeddings.patch_embedding.weight"]
    for name in samples:
        assert vllm_loaded_name(name, maps_transformers_siglip=False) == mapper._map_name(name), name


def test_check_refuses_transformers_layout_for_the_stock_loader_only(tiny_model, tiny_model_transformers_layout):
    names, config = names_of(tiny_model_transformers_layout), config_of(tiny_model_transformers_layout)
    problems = check_tensor_names(names, config, maps_transformers_siglip=False)
    assert len(problems) == 1 and "transformers 5's save_pretrained layout" in problems[0]
    assert check_tensor_names(names, config, maps_transformers_siglip=True) == []
    assert check_tensor_names(names_of(tiny_model), config_of(tiny_model), maps_transformers_siglip=False) == []


def test_check_names_a_lost_tensor_and_a_lost_layer(tiny_model_transformers_layout):
    names, config = names_of(tiny_model_transformers_layout), config_of(tiny_model_transformers_layout)
    assert config["text_config"]["num_hidden_layers"] == 3 and config["vision_config"]["num_hidden_layers"] == 2
    lost_one = [n for n in names if n != "language_model.model.layers.1.self_attn.q_proj.weight"]
    assert check_tensor_names(lost_one, config, maps_transformers_siglip=True) == [
        "text layer 1 lacks self_attn.q_proj.weight"]
    lost_layer = [n for n in names if not n.startswith("vision_tower.encoder.layers.1.")]
    assert check_tensor_names(lost_layer, config, maps_transformers_siglip=True) == [
        "vision layers 1 of 2 have no tensors"]
    # The same tensor lost from every layer: still named, against what every Gemma 3 layer holds.
    no_gate = [n for n in names if not n.endswith("mlp.gate_proj.weight")]
    assert check_tensor_names(no_gate, config, maps_transformers_siglip=True) == [
        f"text layer {i} lacks mlp.gate_proj.weight" for i in range(3)]
    stray = names + ["model.unknown.weight"]
    assert check_tensor_names(stray, config, maps_transformers_siglip=True) == [
        "1 tensors are outside the modules vLLM's Gemma 3 loads, e.g. 'model.unknown.weight'"]


def test_rewrite_to_google_layout_keeps_every_tensor(tmp_path, tiny_model_transformers_layout):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_transformers_layout, copy)
    before = {to_google_name(k): v for k, v in load_file(str(next(copy.glob("*.safetensors")))).items()}
    renamed = sum(1 for n in names_of(copy) if to_google_name(n) != n)
    assert to_google_layout(copy) == renamed > 0
    after = load_file(str(next(copy.glob("*.safetensors"))))
    assert after.keys() == before.keys() and all((after[k] == before[k]).all() for k in after)
    assert not has_transformers_siglip(read_local_names(copy))
    assert to_google_layout(copy) == 0  # idempotent: nothing left to rename, nothing rewritten
    assert check_tensor_names(read_local_names(copy), config_of(copy), maps_transformers_siglip=False) == []


def test_headers_read_locally_and_from_s3_agree(tiny_model_transformers_layout, s3_server, s3_env):
    client = s3_server.client()
    for path in tiny_model_transformers_layout.iterdir():
        client.upload_file(str(path), "data", f"models/alt/{path.name}")
    storage = StorageSection()
    local = checkpoint_tensor_names(str(tiny_model_transformers_layout), storage)
    assert sorted(local) == sorted(names_of(tiny_model_transformers_layout))
    assert sorted(checkpoint_tensor_names("s3://data/models/alt", storage)) == sorted(local)
    info = inspect_checkpoint("s3://data/models/alt", storage)
    with pytest.raises(CheckpointError, match=r"^s3://data/models/alt cannot be loaded by vLLM's Gemma 3: it keeps"):
        check_loadable(info, storage, maps_transformers_siglip=False)
    check_loadable(info, storage, maps_transformers_siglip=True)


HUB_STANDIN = textwrap.dedent('''
    """A stand-in for the Hugging Face hub on loopback (the real hub cannot be reached here): answers as
    the hub does, by status and X-Error-Code header, per repository name."""
    import http.server, json, sys, threading
    ANSWERS = {"org/gated": (403, "GatedRepo"), "org/missing": (404, "RepoNotFound"),
               "org/private": (401, None), "org/forbidden": (403, None), "org/nofile": (404, "EntryNotFound")}
    class Handler(http.server.BaseHTTPRequestHandler):
        def answer(self):
            repo = "/".join(self.path.lstrip("/").split("/")[:2])
            status, code = ANSWERS.get(repo, (500, None))
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("Content-Length", "0")
            self.end_headers()
        do_HEAD = do_GET = answer
        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    import os
    os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{server.server_address[1]}"
    os.environ.pop("HF_HUB_OFFLINE", None); os.environ.pop("TRANSFORMERS_OFFLINE", None)
    from pipeline.engine.checkpoint import CheckpointError, read_checkpoint_file
    from pipeline.config import StorageSection
    results = {}
    for repo in sys.argv[1:]:
        try:
            results[repo] = repr(read_checkpoint_file(repo, "config.json", StorageSection()))
        except CheckpointError as exc:
            results[repo] = str(exc)
    print(json.dumps(results))
''')


def test_hub_errors_say_what_failed_once(tmp_path):
    repos = ["org/gated", "org/missing", "org/private", "org/forbidden", "org/nofile"]
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_HOME"] = str(tmp_path / "hf")
    result = subprocess.run([sys.executable, "-c", HUB_STANDIN, *repos], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    assert "is gated on the Hugging Face hub" in answers["org/gated"]
    assert "was not found on the Hugging Face hub, or it is private" in answers["org/missing"]
    assert "refused org/private (HTTP 401): the token (HF_TOKEN) is missing, wrong" in answers["org/private"]
    assert "refused org/forbidden (HTTP 403)" in answers["org/forbidden"]
    assert answers["org/nofile"] == "None"  # the repository exists without that file: not an error here
    assert "Retrying" not in result.stderr


def test_unreachable_hub_fails_at_once(tmp_path):
    code = ("from pipeline.engine.checkpoint import read_checkpoint_file, CheckpointError\n"
            "from pipeline.config import StorageSection\n"
            "try:\n    read_checkpoint_file('RedHatAI/gemma-3-12b-it-FP8-dynamic', 'config.json', StorageSection())\n"
            "except CheckpointError as exc:\n    print(exc)\n")
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="https://hub.invalid")  # .invalid never resolves
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert result.stdout.startswith("cannot reach the Hugging Face hub (https://hub.invalid) to read "
                                    "RedHatAI/gemma-3-12b-it-FP8-dynamic"), result.stdout + result.stderr[-1000:]
    assert "Retrying" not in result.stderr
    offline = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                             env={**env, "HF_HUB_OFFLINE": "1"})
    assert offline.stdout.startswith("HF_HUB_OFFLINE is set and config.json of RedHatAI/gemma-3-12b-it-FP8-dynamic"
                                     " is not in the local Hugging Face cache")
