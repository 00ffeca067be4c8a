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


def test_help_shows_examples_dry_run_and_report(capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_info:
        caption.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for expected in ("python -m jobs.caption --input data/records --output out/captions", "ray job submit",
                     "--dry-run", "--set batch.engine_replicas=[1,8]", "report.gpu_hourly_usd",
                     "runtime.metrics_export_port", "_report/report.html", "python -m jobs.report", "Exit codes"):
        assert expected in out, expected


def test_dry_run_refuses_an_invalid_config_like_the_run(tmp_path, caplog):
    code, log = run(["--input", "x", "--output", str(tmp_path / "o"), "--dry-run", "--set", "engine.device=tpu"],
                    caplog)
    assert code == 2 and "engine.device: Input should be 'gpu' or 'cpu' (got 'tpu')" in log
