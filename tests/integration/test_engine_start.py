"""A checkpoint the engine cannot load (one tensor of the wrong shape: its names pass the driver's check)
ends the job in one line with vLLM's root error, exit 2, and nothing written as complete."""
import json
import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file, save_file

from pipeline.testing.sample_data import sample_images
from tests.conftest import TINY_CPU_CONFIG, run_job

pytestmark = pytest.mark.integration

RESHAPED = "language_model.model.layers.1.mlp.down_proj.weight"


def test_engine_start_failure_is_one_line_and_exit_2(tmp_path, tiny_model):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    tensors[RESHAPED] = tensors[RESHAPED][:, :-1].contiguous()  # one input feature short
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    images = sample_images(2)
    pq.write_table(pa.table({"id": ["a", "b"], "image": [s.data for s in images]}), tmp_path / "records.parquet")
    output = tmp_path / "out"

    result = run_job("jobs.caption", "--input", str(tmp_path / "records.parquet"), "--output", str(output),
                     "--config", str(TINY_CPU_CONFIG), "--model", str(broken), timeout_s=900)

    assert result.returncode == 2, result.stderr[-6000:]
    ours = [line for line in result.stderr.splitlines() if " ERROR jobs.caption" in line]
    assert len(ours) == 1, ours
    assert "the vLLM engine failed to start: " in ours[0] and "Engine core initialization failed" not in ours[0]
    # vLLM's own error, naming the wrong dimension (127 where the checkpoint's config says 128).
    assert re.search(r"the vLLM engine failed to start: \w+Error: .*\b127\b", ours[0]), ours[0]
    assert result.stderr.rstrip().splitlines()[-1] == ours[0], "the job's last word is that line"
    assert not (output / "_manifest.json").exists()
    attempts = json.loads((output / "_attempts.json").read_text())
    assert [a["status"] for a in attempts["attempts"]] == ["failed"], attempts
    assert attempts["attempts"][0]["error"].startswith("EngineStartError: "), attempts
