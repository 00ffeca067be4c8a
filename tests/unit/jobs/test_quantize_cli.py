"""jobs.quantize refuses what it cannot do before downloading or quantizing anything. These run in the
vLLM environment, where llm-compressor is absent: that is itself one of the refusals."""
import json
import subprocess
import sys

import pytest

from jobs.quantize import main

GEMMA3 = {"architectures": ["Gemma3ForConditionalGeneration"], "torch_dtype": "bfloat16"}


def checkpoint(folder, **extra):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**GEMMA3, **extra}))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


@pytest.mark.parametrize("quantization, message", [
    pytest.param({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {}},
                 "is already quantized (compressed-tensors:empty)", id="compressed-tensors"),
    pytest.param({"quant_method": "fp8"}, "is already quantized (fp8)", id="vllm-fp8"),
])
def test_an_already_quantized_source_is_refused(tmp_path, caplog, quantization, message):
    source = checkpoint(tmp_path / "src", quantization_config=quantization)
    assert main(["--model", str(source), "--output", str(tmp_path / "out")]) == 2
    assert message in caplog.text
    assert not (tmp_path / "out").exists()


def test_an_existing_output_needs_overwrite(tmp_path, caplog):
    source = checkpoint(tmp_path / "src")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("{}")
    assert main(["--model", str(source), "--output", str(tmp_path / "out")]) == 2
    assert "already holds 1 entries; pass --overwrite" in caplog.text


def test_the_source_is_never_the_output(tmp_path, caplog):
    source = checkpoint(tmp_path / "src")
    assert main(["--model", str(source), "--output", str(source) + "/", "--overwrite"]) == 2
    assert "is the source checkpoint" in caplog.text
    assert (source / "config.json").exists()


def test_a_missing_config_is_refused(tmp_path, caplog):
    (tmp_path / "src").mkdir()
    assert main(["--model", str(tmp_path / "src"), "--output", str(tmp_path / "out")]) == 2
    assert "no config.json" in caplog.text


def test_without_llm_compressor_it_points_at_the_quantize_environment(tmp_path, caplog):
    source = checkpoint(tmp_path / "src")
    assert main(["--model", str(source), "--output", str(tmp_path / "out")]) == 2
    assert "llm-compressor is not installed" in caplog.text and "make quantize-env" in caplog.text
    assert list(tmp_path.iterdir()) == [source], "no staging directory is left behind"


def test_quantize_modules_import_without_torch_or_llm_compressor():
    code = ("import sys, jobs.quantize, pipeline.quantize.make, pipeline.quantize.verify; "
            "print([m for m in ('torch', 'safetensors', 'llmcompressor', 'compressed_tensors', 'vllm') "
            "if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout
