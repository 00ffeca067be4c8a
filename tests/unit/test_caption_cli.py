"""jobs.caption refuses what would fail later with exit code 2 and a message, before Ray or a GPU."""
import json
import logging

from jobs import caption


def run(argv, caplog):
    with caplog.at_level(logging.ERROR, logger="jobs.caption"):
        code = caption.main(argv)
    return code, caplog.text


def test_invalid_config_field(tmp_path, caplog):
    code, log = run(["--input", "x", "--output", str(tmp_path / "o"), "--set", "engine.max_num_seq=1"], caplog)
    assert code == 2 and "engine.max_num_seq: unknown field" in log


def test_wrong_checkpoint_scheme_is_refused_before_ray(tmp_path, caplog):
    model = tmp_path / "bf16-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["Gemma3ForConditionalGeneration"]}))
    code, log = run(["--input", "x", "--output", str(tmp_path / "o"), "--model", str(model)], caplog)
    assert code == 2 and "holds scheme 'none' but model.quantization is 'fp8-dynamic'" in log


def test_existing_output_needs_overwrite(tmp_path, caplog):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["Gemma3ForConditionalGeneration"]}))
    out = tmp_path / "out"
    out.mkdir()
    (out / "part-0.parquet").write_bytes(b"")
    code, log = run(["--input", "x", "--output", str(out), "--model", str(model),
                     "--set", "model.quantization=any"], caplog)
    assert code == 2 and "pass --overwrite" in log
