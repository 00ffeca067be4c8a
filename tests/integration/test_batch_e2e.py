"""The batch job end to end: real vLLM (CPU build) engine, real local Ray, real S3 server process.

24 good records (8 as bytes, 8 as local paths, 8 as s3:// URIs) and one record of each bad kind the
contract names are read from S3 in two parquet files; the output is written back to S3 and read again.
Local reads are allowed under the images folder only, s3:// under data/images only: an image in another
bucket the credentials can read is refused.
"""
import io
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import StorageSection
from pipeline.io.storage import make_filesystem
from pipeline.testing.sample_data import sample_images
from tests.conftest import TINY_CPU_CONFIG, run_job

pytestmark = pytest.mark.integration

SCHEMA = pa.schema([("id", pa.string()), ("image", pa.binary()), ("image_uri", pa.string()),
                    ("prompt", pa.string()), ("note", pa.string()), ("batch_no", pa.int32())])


def _png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", size, 0).save(buffer, format="PNG")
    return buffer.getvalue()


def build_records(tmp_path, s3_client):
    """(records, expected error kind by id or note) with every source and every bad kind."""
    good, images_dir = [], tmp_path / "images"
    images_dir.mkdir()
    for index, sample in enumerate(sample_images(24)):
        record = {"id": f"good-{index:02d}", "image": None, "image_uri": None, "note": sample.name,
                  "prompt": "Describe the image." if index % 2 else None, "batch_no": index}
        if index % 3 == 0:
            record["image"] = sample.data
        elif index % 3 == 1:
            path = images_dir / sample.name
            path.write_bytes(sample.data)
            record["image_uri"] = str(path)
        else:
            s3_client.put_object(Bucket="data", Key=f"images/{sample.name}", Body=sample.data)
            record["image_uri"] = f"s3://data/images/{sample.name}"
        good.append(record)
    jpeg = next(s.data for s in sample_images(24) if s.name.endswith(".jpg"))
    s3_client.create_bucket(Bucket="private")
    s3_client.put_object(Bucket="private", Key="photo.jpg", Body=jpeg)
    bad = [
        ("bad-truncated", {"image": jpeg[: len(jpeg) // 3]}, "corrupt_image"),
        ("bad-not-image", {"image": b"%PDF-1.4 this is a document, not a picture" * 5}, "not_an_image"),
        ("bad-empty", {"image": b""}, "empty_image"),
        ("bad-missing-image", {}, "missing_image"),
        ("bad-too-many-pixels", {"image": _png((6000, 6000))}, "too_many_pixels"),
        ("bad-unreachable", {"image_uri": "http://images.unreachable.invalid/cat.jpg"}, "unreachable"),
        ("bad-metadata-service", {"image_uri": "http://169.254.169.254/latest/meta-data/"}, "uri_not_allowed"),
        ("bad-s3-missing", {"image_uri": "s3://data/images/no-such-image.jpg"}, "not_found"),
        ("bad-foreign-bucket", {"image_uri": "s3://private/photo.jpg"}, "uri_not_allowed"),
        (None, {"image": jpeg, "note": "record-without-id"}, "missing_id"),
        ("dup-1", {"image": jpeg, "note": "dup-first"}, "duplicate_id"),
        ("dup-1", {"image": jpeg, "note": "dup-second"}, "duplicate_id"),
    ]
    records = list(good)
    expected_errors = {}
    for record_id, fields, kind in bad:
        record = {"id": record_id, "image": None, "image_uri": None, "prompt": None, "note": None,
                  "batch_no": -1, **fields}
        records.append(record)
        expected_errors[record["note"] or record_id] = kind
    return records, good, expected_errors


@pytest.fixture
def ray_tmp():
    """Ray's files for this job's embedded cluster (RAY_TMPDIR), so its actors' logs can be read; short,
    as Ray's socket paths live under it."""
    path = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def finished_worker_logs(ray_tmp: Path, timeout_s: float = 180) -> str:
    """The stderr of the job's Ray workers, read once no process has them open: vLLM's engine core, its
    Worker and their resource tracker write to their engine actor's stderr and may outlive the job."""
    logs = {str(path) for path in ray_tmp.glob("ray/session_*/logs/worker-*.err")}
    assert logs, f"no Ray worker logs under {ray_tmp}"

    def writers() -> set[str]:
        found = set()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in logs:
                        flags = open(f"/proc/{pid}/fdinfo/{fd}").read().split("flags:")[1].split()[0]
                        if int(flags, 8) & (os.O_WRONLY | os.O_RDWR):  # not Ray's log monitor, a reader
                            found.add(pid)
            except OSError:
                continue
        return found

    deadline = time.monotonic() + timeout_s
    while (left := writers()) and time.monotonic() < deadline:
        time.sleep(1)
    assert not left, f"processes {left} still write to the job's worker logs {timeout_s}s after it ended"
    return "".join(Path(path).read_text(errors="replace") for path in sorted(logs))


def test_caption_job_on_s3_with_bad_records(tmp_path, tiny_model, s3_server, s3_env, ray_tmp):
    client = s3_server.client()
    records, good, expected_errors = build_records(tmp_path, client)
    # Two input files, interleaving good and bad records.
    for part in range(2):
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(records[part::2], schema=SCHEMA), buffer)
        client.put_object(Bucket="data", Key=f"input/part-{part}.parquet", Body=buffer.getvalue())

    result = run_job("jobs.caption", "--input", "s3://data/input", "--output", "s3://data/output/run1",
                     "--config", str(TINY_CPU_CONFIG), "--model", str(tiny_model),
                     "--set", "images.max_pixels=30000000", "--set", "batch.rows_per_file=8",
                     "--set", "fetch.allow_local_paths=true",
                     "--set", f"fetch.local_path_prefixes=[{tmp_path / 'images'}]",
                     "--set", "fetch.s3_prefixes=[data/images]",
                     env={**s3_env, "RAY_TMPDIR": str(ray_tmp)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    # Issue 20: a run that went well prints no traceback, its engine's shutdown included (bad records are
    # error rows, not tracebacks). The engine processes' own stderr is read too, once they are all gone:
    # what they print after the driver has exited never reaches its stderr. Ray killed the resource
    # tracker with the engine actor's children, and vLLM's Worker, unregistering its shared memory in a
    # new one, printed a `KeyError: '/psm_...'` traceback (pipeline.engine.shm_tracker).
    assert "Traceback" not in result.stderr, result.stderr[-6000:]
    worker_logs = finished_worker_logs(ray_tmp)
    assert "resource_tracker: process died unexpectedly" not in worker_logs, worker_logs[-6000:]
    assert "KeyError: '/psm_" not in worker_logs and "KeyError: '/mp-" not in worker_logs, worker_logs[-6000:]

    fs, path = make_filesystem(StorageSection(endpoint_url=s3_env["AWS_ENDPOINT_URL"], region="us-east-1"),
                               "s3://data/output/run1")
    output = pads.dataset(path, filesystem=fs, format="parquet")
    table = output.to_table()
    rows = table.to_pylist()

    # Exactly one output row per input row, sharded by the configured row count.
    assert len(rows) == len(records) == 36
    assert len(output.files) >= 5 and all(pq.ParquetFile(f, filesystem=fs).metadata.num_rows <= 8
                                          for f in output.files)

    by_id = Counter(r["id"] for r in rows)
    for record in good:
        assert by_id[record["id"]] == 1
    ok = {r["id"]: r for r in rows if r["error"] is None}
    assert set(ok) == {r["id"] for r in good}, "exactly the good records succeed"
    for record in good:
        out = ok[record["id"]]
        assert out["text"], out
        assert out["prompt_tokens"] > 256, "the image's 256 soft tokens are part of the prompt"
        assert out["completion_tokens"] > 0 and out["finish_reason"] in ("stop", "length")
        assert out["model"] == "gemma-3-12b-it"
        assert (out["note"], out["batch_no"]) == (record["note"], record["batch_no"]), "pass-through columns"
        assert out["prompt"] == (record["prompt"] or "Describe this image in one detailed paragraph.")
        assert out["image_uri"] == record["image_uri"]

    errors = [r for r in rows if r["error"] is not None]
    assert len(errors) == len(records) - len(good)
    for row in errors:
        key = row["note"] or row["id"]
        assert row["error_kind"] == expected_errors[key], row
        assert row["error"].startswith(row["error_kind"] + ": ") and len(row["error"]) > len(row["error_kind"]) + 5
        assert row["text"] is None and row["completion_tokens"] is None
    assert sum(r["error_kind"] == "duplicate_id" for r in errors) == 2
    missing_id = [r for r in errors if r["error_kind"] == "missing_id"]
    assert missing_id[0]["id"] is None and missing_id[0]["source"].endswith(".parquet")

    manifest = json.loads(client.get_object(Bucket="data", Key="output/run1/_manifest.json")["Body"].read())
    assert manifest["status"] == "complete"
    assert manifest["counts"]["rows_in"] == manifest["counts"]["rows_out"] == 36
    assert manifest["counts"]["ok"] == 24 and manifest["counts"]["errors"] == 12
    assert manifest["counts"]["errors_by_kind"] == dict(Counter(expected_errors[k] for k in expected_errors) |
                                                         {"duplicate_id": 2})
    assert manifest["tokens"]["completion"] == sum(r["completion_tokens"] for r in ok.values())
    assert manifest["throughput"]["rows_per_s"] > 0
    assert manifest["model"]["scheme"] == "none" and manifest["versions"]["ray"] == "2.60.0"
    assert manifest["config"]["engine"]["device"] == "cpu"
    # The run report lands beside the manifest on S3 too (and parquet readers above skipped it).
    report = client.get_object(Bucket="data", Key="output/run1/_report/report.html")["Body"].read().decode()
    assert 'data-metric="rows_out" data-value="36"' in report
