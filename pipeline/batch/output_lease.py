"""One writer per output prefix: a lease object that a job creates before it changes anything there.

A second job on a prefix that a live job writes would otherwise decide "resume", mark the first one
interrupted, abort its multipart uploads and let Ray Data's checkpoint filter delete its in-flight files.
So every batch job takes the prefix's lease first, and a job that finds a live lease stops at once, having
written nothing (`OutputInUseError`; jobs.caption exits 4).

Layout (pyarrow and Ray Data skip `_`-prefixed names, so readers of OUTPUT never see it):

    OUTPUT/_lease/<generation:06d>.json   {job_id, host, pid, pid_namespace, started_at, heartbeat_at, ttl_s}

The objects are the schedule ledger's (pipeline.ops.ledger): `create` writes only if the name is absent (S3
`If-None-Match: *`, checked once per acquire by the ledger's probe; locally a hard link). The newest
generation is the lease:

- free (no generation): create 000001; of two jobs starting together exactly one wins, the other is refused.
- held, heartbeat younger than its ttl_s: refused, unless its owner ran on this host, in this PID namespace,
  and that PID is gone (a driver killed a moment ago; its rerun need not wait out the TTL).
- stale: create generation n+1 (again one winner), then delete the older ones.

While the job runs, a thread in the driver rewrites its own generation's heartbeat every ttl_s/4, never
anyone else's. Before each beat it checks that its object is still there with its job_id and that no newer
generation exists; if either fails (its beats were missed for a whole TTL and another job took over) the
lease is lost: `on_lost` runs once (the driver interrupts its own run) and nothing more is written. At the
end the job deletes its generation. Heartbeats are wall-clock times of the writer: the TTL must exceed
the clock skew between hosts (the default, 300 s, does by far).
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Callable, Optional

from pipeline.config import StorageSection
from pipeline.ops.ledger import Ledger, LedgerStore, open_store

logger = logging.getLogger(__name__)

LEASE_DIR = "_lease"
_GENERATION = re.compile(r"^(\d{6})\.json$")


class OutputInUseError(RuntimeError):
    """Another live job holds the output prefix's lease (or took it over from this one)."""


def pid_namespace() -> Optional[str]:
    """This process's PID namespace (`pid:[4026531836]`): a PID means the same process only inside one."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def describe(record: dict[str, Any], now: float) -> str:
    age = now - float(record.get("heartbeat_at", 0))
    started = record.get("started_at")
    if isinstance(started, (int, float)):
        started = datetime.fromtimestamp(started, tz=timezone.utc).isoformat(timespec="seconds")
    return (f"job {record.get('job_id', '?')} on host {record.get('host', '?')} pid {record.get('pid', '?')}, "
            f"started {started or '?'}, last heartbeat {age:.0f}s ago")


class OutputLease:
    """The writer lease of one output prefix; `acquire` takes it or raises OutputInUseError."""

    def __init__(self, store: LedgerStore, output_uri: str, *, ttl_s: float, clock: Callable[[], float] = time.time,
                 on_lost: Optional[Callable[[], None]] = None):
        self.store, self.output_uri, self.ttl_s, self.clock = store, output_uri, ttl_s, clock
        self.on_lost = on_lost
        self.job_id = uuid.uuid4().hex[:16]
        self.generation: Optional[int] = None
        self.record: dict[str, Any] = {}
        self.lost = False
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread: Optional[threading.Thread] = None

    @classmethod
    def for_output(cls, storage: StorageSection, output_uri: str, **kwargs: Any) -> "OutputLease":
        return cls(open_store(storage, output_uri, LEASE_DIR), output_uri, **kwargs)

    # -------------------------------------------------------------- reading
    def generations(self) -> list[int]:
        return sorted(int(m.group(1)) for m in (_GENERATION.match(n) for n in self.store.list("")) if m)

    def holder(self) -> Optional[tuple[int, dict[str, Any]]]:
        """The newest generation and its record, or None when the prefix is free."""
        for _ in range(3):
            generations = self.generations()
            if not generations:
                return None
            data = self.store.get(_name(generations[-1]))
            if data is None:  # released or superseded between the listing and the read: look again
                continue
            try:
                return generations[-1], json.loads(data)
            except ValueError:  # not a lease we can read; counts as stale (heartbeat 0)
                return generations[-1], {}
        return None

    def is_stale(self, record: dict[str, Any]) -> bool:
        """Its owner stopped beating for longer than its own TTL, or it is a dead process of this host."""
        ttl = float(record.get("ttl_s") or self.ttl_s)
        if self.clock() - float(record.get("heartbeat_at", 0)) > ttl:
            return True
        same_pids = (record.get("host") == socket.gethostname() and record.get("pid_namespace") is not None
                     and record.get("pid_namespace") == pid_namespace())
        return same_pids and isinstance(record.get("pid"), int) and not _pid_alive(record["pid"])

    # -------------------------------------------------------------- taking and giving back
    def acquire(self) -> "OutputLease":
        """Take the lease, or raise OutputInUseError having written nothing under the prefix."""
        checked = False
        for _ in range(5):
            current = self.holder()
            if current is not None and not self.is_stale(current[1]):
                raise OutputInUseError(
                    f"output {self.output_uri} is in use by another job ({describe(current[1], self.clock())}; "
                    f"its lease goes stale after {float(current[1].get('ttl_s') or self.ttl_s):.0f}s without a "
                    "heartbeat); nothing was changed: wait for that job, or use another output prefix")
            if not checked:  # only now do we write: a refused job leaves the prefix untouched
                Ledger(self.store, lease_s=self.ttl_s).check_exclusive_create()
                _remove_empty_local_dirs(self.store, root=False)
                checked = True
            generation = 1 if current is None else current[0] + 1
            now = self.clock()
            record = {"job_id": self.job_id, "generation": generation, "output": self.output_uri,
                      "host": socket.gethostname(), "pid": os.getpid(), "pid_namespace": pid_namespace(),
                      "started_at": now, "heartbeat_at": now, "ttl_s": self.ttl_s,
                      "took_over": describe(current[1], now) if current is not None else None}
            if self.store.create(_name(generation), _dumps(record)):
                self.generation, self.record = generation, record
                if current is not None:
                    logger.warning("output %s: took over the stale lease of %s", self.output_uri,
                                   describe(current[1], now))
                for older in (g for g in self.generations() if g < generation):
                    self.store.delete(_name(older))
                logger.info("output %s: lease %s taken (job %s; heartbeat every %.0fs, stale after %.0fs)",
                            self.output_uri, self.store.uri(_name(generation)), self.job_id, self.ttl_s / 4,
                            self.ttl_s)
                return self
            # Another job created this generation first: look again (it is live, so we will be refused).
        raise OutputInUseError(f"output {self.output_uri}: could not take the lease; other jobs keep taking it")

    def release(self) -> None:
        """Stop beating and delete our generation (when it is still ours)."""
        self.stop_heartbeat()
        with self._lock:
            if self.generation is None or self.lost:
                return
            if self._still_ours():
                self.store.delete(_name(self.generation))
                _remove_empty_local_dirs(self.store, root=True)
            self.generation = None

    # -------------------------------------------------------------- heartbeat
    def start_heartbeat(self, interval_s: Optional[float] = None) -> None:
        interval = self.ttl_s / 4 if interval_s is None else interval_s
        self._thread = threading.Thread(target=self._beat_loop, args=(interval,), daemon=True,
                                        name=f"output-lease-{self.job_id}")
        self._thread.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def beat(self) -> bool:
        """Renew the heartbeat; False (and `on_lost` called once) when the lease is no longer ours."""
        was_lost = self.lost
        if self._renew():
            return True
        if was_lost:
            return False
        logger.error("output %s: the lease was taken over by another job (%s); this job stops writing",
                     self.output_uri, self._newest_description())
        if self.on_lost is not None:
            self.on_lost()
        return False

    def check_held(self) -> None:
        """Raise OutputInUseError when the lease is no longer ours (checked before the manifest is written)."""
        if not self._renew():
            raise OutputInUseError(f"output {self.output_uri}: this job's lease was taken over by another job "
                                   f"({self._newest_description()}); it wrote nothing more")

    def _renew(self) -> bool:
        with self._lock:
            if self.lost:
                return False
            if self.generation is None:
                return True
            if not self._still_ours():
                self.lost = True
                return False
            self.record["heartbeat_at"] = self.clock()
            self.store.put(_name(self.generation), _dumps(self.record))
            return True

    def _still_ours(self) -> bool:
        data = self.store.get(_name(self.generation))
        if data is None or json.loads(data).get("job_id") != self.job_id:
            return False
        return not any(g > self.generation for g in self.generations())

    def _newest_description(self) -> str:
        try:
            current = self.holder()
        except Exception:  # storage down: the reason is in the log already
            return "holder unknown"
        return describe(current[1], self.clock()) if current else "no holder now"

    def _beat_loop(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                if not self.beat():
                    return
            except Exception as exc:  # storage down for a moment: the TTL allows several missed beats
                logger.warning("output %s: lease heartbeat failed: %s", self.output_uri, exc)

    def __enter__(self) -> "OutputLease":
        self.acquire()
        self.start_heartbeat()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.release()
        except Exception:  # never mask the job's own error; a stale lease is taken over later
            logger.exception("output %s: could not release the lease", self.output_uri)


def interrupt_driver() -> Callable[[], None]:
    """An `on_lost` for a job's driver: interrupt its main thread (KeyboardInterrupt), which stops Ray Data's
    execution, so that a job that lost its prefix writes no more files there. A run on another thread (a
    schedule tick) only stops at the manifest (`check_held`)."""
    import _thread

    on_main = threading.current_thread() is threading.main_thread()
    return _thread.interrupt_main if on_main else (lambda: None)


def _name(generation: int) -> str:
    return f"{generation:06d}.json"


def _dumps(record: dict[str, Any]) -> bytes:
    return json.dumps(record, indent=1, default=str).encode()


def _remove_empty_local_dirs(store: LedgerStore, root: bool) -> None:
    """On a local disk, the folders the probe (and, at release, the lease) leave empty."""
    folder = getattr(store, "root", None)
    for empty in ((folder / "probes", folder) if root else (folder / "probes",)) if folder is not None else ():
        try:
            empty.rmdir()  # only when empty
        except OSError:
            pass
