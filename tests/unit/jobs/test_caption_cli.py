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


def test_complete_output_is_left_alone_without_starting_ray(tmp_path, caplog):
    from pipeline.config import PipelineConfig
    from pipeline.batch.resume import fingerprint_input

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["Gemma3ForConditionalGeneration"]}))
    records = tmp_path / "records"
    records.mkdir()
    (records / "part-0.parquet").write_bytes(b"PAR1")
    out = tmp_path / "out"
    out.mkdir()
    (out / "part-0.parquet").write_bytes(b"")
    manifest = {"status": "complete", "output": str(out), "counts": {"rows_in": 3, "rows_out": 3},
                "throughput": {"rows_per_s": 1.0},
                "input_fingerprint": fingerprint_input(PipelineConfig.load(environ={}), str(records))}
    (out / "_manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.INFO):
        code = caption.main(["--input", str(records), "--output", str(out), "--model", str(model),
                             "--set", "model.quantization=any"])
    assert code == 0 and "is already complete (3 rows for 3 input rows); nothing to do" in caplog.text
    assert "starting embedded local Ray" not in caplog.text
    assert json.loads((out / "_manifest.json").read_text()) == manifest


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
