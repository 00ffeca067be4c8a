"""The schedule's ledger: which input files were captioned, with claims that overlapping ticks cannot share.

Layout under OUTPUT/_ledger/ (pyarrow and Ray Data skip `_`-prefixed names, so readers of OUTPUT never
see it):

    claims/<key>/<attempt:06d>.json   an attempt at one file version; written only if absent
    done/<key>.json                   that file version is captioned (by which run, into runs/<run_id>/)
    runs/<run_id>.json                a tick's record: status, files, heartbeat, output, Ray job
    runs/<run_id>.inputs.txt          the run's files, handed to the caption job as --input-list

A file version's key hashes its URI and version (the S3 ETag; locally mtime and size), so a file rewritten
in place is captioned again. Claims are the only concurrency control: creating `claims/<key>/<n>.json`
succeeds for exactly one writer (S3 `If-None-Match: *`; locally a hard link, which fails if the name
exists), and a tick creates attempt n+1 only when attempt n belongs to a run that failed or whose lease
ran out. So overlapping ticks never caption a file twice, and the next tick retries a failed tick's files.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

from pipeline.config import StorageSection
from pipeline.io.storage import is_s3, make_s3_client, split_s3

logger = logging.getLogger(__name__)

LEDGER_DIR = "_ledger"
RUNNING, SUCCEEDED, FAILED = "running", "succeeded", "failed"


class LedgerError(RuntimeError):
    """The ledger cannot guarantee exclusive claims (e.g. the S3 endpoint ignores conditional writes)."""


@dataclass(frozen=True)
class InputFile:
    """One version of one input file."""

    uri: str
    version: str  # S3 ETag, or "<mtime_ns>-<size>" for a local file
    size: int

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.uri}\n{self.version}".encode()).hexdigest()[:40]

    def as_dict(self) -> dict[str, Any]:
        return {"uri": self.uri, "version": self.version, "size": self.size, "key": self.key}


def list_input_files(storage: StorageSection, input_uri: str) -> list[InputFile]:
    """The parquet files under `input_uri` (a prefix or one file, local or s3://), sorted by URI.

    Names with a path component starting with `_` or `.` are skipped, as pyarrow and Spark do
    (`_SUCCESS`, `.tmp` uploads). Local URIs become absolute paths, so a job on another working directory
    finds them.
    """
    if is_s3(input_uri):
        return _list_s3_files(storage, input_uri)
    local = Path(input_uri[len("file://"):] if input_uri.startswith("file://") else input_uri).resolve()
    if local.is_file():
        candidates, root = [local], local.parent
    else:
        candidates, root = (sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else []), local
    files = []
    for path in candidates:
        if _listed(path.relative_to(root).as_posix()):
            stat = path.stat()
            files.append(InputFile(str(path), f"{stat.st_mtime_ns}-{stat.st_size}", stat.st_size))
    return files


def _list_s3_files(storage: StorageSection, input_uri: str) -> list[InputFile]:
    client = make_s3_client(storage)
    bucket, key = split_s3(input_uri)
    prefix = key if key.lower().endswith(".parquet") else (key.rstrip("/") + "/" if key else "")
    files = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for entry in page.get("Contents", []):
            relative = entry["Key"][len(prefix):] if entry["Key"] != prefix else entry["Key"].rsplit("/", 1)[-1]
            if _listed(relative):
                files.append(InputFile(f"s3://{bucket}/{entry['Key']}", entry["ETag"].strip('"'), entry["Size"]))
    return sorted(files, key=lambda f: f.uri)


def _listed(relative: str) -> bool:
    parts = relative.split("/")
    return relative.lower().endswith(".parquet") and not any(p.startswith(("_", ".")) for p in parts)


# ------------------------------------------------------------------ stores
class LedgerStore(Protocol):
    """Small objects under one root. `create` is the one atomic primitive: it writes only if absent."""

    def create(self, name: str, data: bytes) -> bool: ...
    def put(self, name: str, data: bytes) -> None: ...
    def get(self, name: str) -> Optional[bytes]: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete(self, name: str) -> None: ...
    def uri(self, name: str) -> str: ...


class LocalLedgerStore:
    """A directory. `create` writes a temporary file and hard-links it to the name: link(2) fails when
    the name exists, so exactly one writer wins and a reader never sees a half-written claim."""

    def __init__(self, root: Path):
        self.root = root

    def create(self, name: str, data: bytes) -> bool:
        target = self.root / name
        temporary = self._temporary_beside(target, data)
        try:
            os.link(temporary, target)
            return True
        except FileExistsError:
            return False
        finally:
            temporary.unlink(missing_ok=True)

    def put(self, name: str, data: bytes) -> None:
        target = self.root / name
        os.replace(self._temporary_beside(target, data), target)

    @staticmethod
    def _temporary_beside(target: Path, data: bytes, attempts: int = 5) -> Path:
        """`data` in a temporary file in `target`'s folder, made if missing. Another writer may remove that
        folder once it is empty (the output lease tidies its folders), between our mkdir and our write,
        or while mkdir checks it: retried. Once the temporary file is in it, the folder is not empty and
        stays."""
        for attempt in range(attempts):
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                temporary = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
                temporary.write_bytes(data)
                return temporary
            except (FileNotFoundError, FileExistsError):
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def get(self, name: str) -> Optional[bytes]:
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:
            return None

    def list(self, prefix: str) -> list[str]:
        # os.walk, not Path.rglob: a folder another writer removes meanwhile is skipped, not an error.
        names = []
        for folder, _, files in os.walk(self.root / prefix):
            names += [(Path(folder) / f).relative_to(self.root).as_posix() for f in files if not f.startswith(".")]
        return sorted(names)

    def delete(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def uri(self, name: str) -> str:
        return str(self.root / name)


class S3LedgerStore:
    """A prefix in a bucket. `create` is a PUT with `If-None-Match: *` (AWS S3 since 2024-08, SeaweedFS,
    MinIO): the first writer gets 200, every later one 412. A 409 (a concurrent conditional write is in
    progress) also counts as lost: the file then waits for the next tick, it is never taken twice."""

    def __init__(self, client, bucket: str, prefix: str):
        self.client, self.bucket, self.prefix = client, bucket, prefix.rstrip("/") + "/"

    def create(self, name: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=data, IfNoneMatch="*")
            return True
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
                return False
            raise

    def put(self, name: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=data)

    def get(self, name: str) -> Optional[bytes]:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.prefix + name)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise

    def list(self, prefix: str) -> list[str]:
        names = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                           Prefix=self.prefix + prefix):
            names += [entry["Key"][len(self.prefix):] for entry in page.get("Contents", [])]
        return sorted(n for n in names if n and not n.endswith("/"))

    def delete(self, name: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.prefix + name)

    def uri(self, name: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{name}"


def open_store(storage: StorageSection, output_uri: str, directory: str = LEDGER_DIR) -> LedgerStore:
    """The store under `output_uri`/`directory` (the ledger's, or a job's writer lease,
    pipeline.batch.output_lease), on S3 or a local directory."""
    if is_s3(output_uri):
        bucket, key = split_s3(output_uri.rstrip("/") + "/")
        return S3LedgerStore(make_s3_client(storage), bucket, key + directory)
    local = output_uri[len("file://"):] if output_uri.startswith("file://") else output_uri
    return LocalLedgerStore(Path(local).resolve() / directory)


# ------------------------------------------------------------------ the ledger
@dataclass
class ClaimOutcome:
    """What one tick's claiming found."""

    claimed: list[InputFile] = field(default_factory=list)
    in_flight: int = 0  # files that live runs of other ticks hold
    lost: int = 0  # files another tick claimed first, in the same instant
    finished: int = 0  # files a run finished after this tick listed the done set


class Ledger:
    """Claims, done markers and run records of one output prefix. Thread-safe: it holds no mutable state
    beyond what the store holds."""

    def __init__(self, store: LedgerStore, *, lease_s: float, clock: Callable[[], float] = time.time,
                 workers: int = 16):
        self.store, self.lease_s, self.clock, self.workers = store, lease_s, clock, workers

    def check_exclusive_create(self) -> None:
        """Refuse a store whose `create` does not refuse an existing name (an S3 endpoint that ignores
        If-None-Match would let two ticks caption the same file)."""
        name = f"probes/{uuid.uuid4().hex}"
        first, second = self.store.create(name, b"1"), self.store.create(name, b"2")
        self.store.delete(name)
        if not first or second:
            raise LedgerError(f"{self.store.uri(name)}: the store does not refuse to overwrite an existing "
                              "object (conditional PUT with If-None-Match unsupported?); overlapping ticks could "
                              "caption a file twice")

    # -------------------------------------------------------------- done set
    def done_keys(self) -> set[str]:
        return {name[len("done/"):-len(".json")] for name in self.store.list("done/") if name.endswith(".json")}

    def mark_done(self, files: list[InputFile], run_id: str) -> None:
        payload = {"run_id": run_id, "finished_at": self.clock()}
        self._parallel(lambda f: self.store.put(f"done/{f.key}.json", _dumps({**f.as_dict(), **payload})), files)

    # -------------------------------------------------------------- runs
    def read_run(self, run_id: str) -> Optional[dict[str, Any]]:
        data = self.store.get(f"runs/{run_id}.json")
        return json.loads(data) if data is not None else None

    def write_run(self, record: dict[str, Any]) -> None:
        self.store.put(f"runs/{record['run_id']}.json", _dumps(record))

    def runs(self) -> list[dict[str, Any]]:
        """Every run record, oldest first (run ids start with their UTC start time)."""
        names = [n for n in self.store.list("runs/") if n.endswith(".json")]
        return [json.loads(data) for data in (self.store.get(n) for n in names) if data is not None]

    def write_inputs(self, run_id: str, files: list[InputFile]) -> str:
        """Write the run's input list (one URI per line) and return its URI, for `--input-list`."""
        name = f"runs/{run_id}.inputs.txt"
        self.store.put(name, "".join(f.uri + "\n" for f in files).encode())
        return self.store.uri(name)

    def is_stale(self, record: dict[str, Any]) -> bool:
        """A running record whose owner stopped renewing its lease (crashed, killed, lost its node)."""
        return record.get("status") == RUNNING and self.clock() - record.get("heartbeat_at", 0) > self.lease_s

    # -------------------------------------------------------------- claims
    def claim(self, files: list[InputFile], run_id: str, run_state: Callable[[str], Optional[str]],
              limit: Optional[int] = None) -> ClaimOutcome:
        """Claim as many of `files` as are free, up to `limit`, for `run_id`.

        `run_state(run_id)` tells what became of the run behind an earlier attempt: SUCCEEDED, RUNNING
        (alive), FAILED (failed, or its lease ran out), or None when no record exists yet (its tick is
        between claiming and writing the record: alive while the claim is younger than the lease).
        """
        outcome = ClaimOutcome()
        results: list[tuple[InputFile, str]] = []
        pending = list(files)
        while pending and (limit is None or len(outcome.claimed) < limit):
            room = len(pending) if limit is None else limit - len(outcome.claimed)
            batch, pending = pending[:room], pending[room:]
            for file, result in zip(batch, self._parallel(lambda f: self._claim_one(f, run_id, run_state), batch)):
                results.append((file, result))
                if result == "claimed":
                    outcome.claimed.append(file)
        for _, result in results:
            if result == "in_flight":
                outcome.in_flight += 1
            elif result == "lost":
                outcome.lost += 1
            elif result == "finished":
                outcome.finished += 1
        return outcome

    def _claim_one(self, file: InputFile, run_id: str, run_state: Callable[[str], Optional[str]]) -> str:
        # A file never claimed before (nearly every file of a tick) costs one conditional PUT: attempt 1 is
        # created only if absent. Where it exists, the LIST below finds the latest attempt and decides.
        if self._create_claim(file, run_id, attempt=1):
            return "claimed"
        attempts = [n for n in self.store.list(f"claims/{file.key}/") if n.endswith(".json")]
        attempt = 1
        if attempts:
            latest_name = attempts[-1]
            latest = json.loads(self.store.get(latest_name) or b"{}")
            state = run_state(latest.get("run_id", ""))
            if state == SUCCEEDED:
                # Its run finished after this tick read the done set (or before writing the marker).
                self.store.put(f"done/{file.key}.json", _dumps({**file.as_dict(), "run_id": latest.get("run_id")}))
                return "finished"
            if state == RUNNING or (state is None and self.clock() - latest.get("claimed_at", 0) <= self.lease_s):
                return "in_flight"
            attempt = int(latest_name.rsplit("/", 1)[-1].split(".")[0]) + 1
        return "claimed" if self._create_claim(file, run_id, attempt) else "lost"

    def _create_claim(self, file: InputFile, run_id: str, attempt: int) -> bool:
        claim = {**file.as_dict(), "run_id": run_id, "attempt": attempt, "claimed_at": self.clock()}
        return self.store.create(f"claims/{file.key}/{attempt:06d}.json", _dumps(claim))

    def _parallel(self, function: Callable[[InputFile], Any], files: list[InputFile]) -> list[Any]:
        if len(files) <= 1:
            return [function(f) for f in files]
        with ThreadPoolExecutor(max_workers=min(self.workers, len(files))) as pool:
            return list(pool.map(function, files))


def _dumps(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, indent=1, default=str).encode()
