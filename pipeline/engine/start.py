"""An engine that cannot start, said in one line with vLLM's own root error.

When a vLLM engine fails to start (a checkpoint tensor of the wrong shape, too little memory for the KV
cache, an unsupported setting), vLLM logs the real error in its engine-core or worker subprocess and
raises only "Engine core initialization failed. See root cause above." in the process that started it.
Ray then wraps that in an ActorDiedError and Ray Data in its own errors, so a job used to end in some
300 lines of tracebacks, exit 1, with the cause somewhere in the middle.

`explain_start_failure` wraps an engine's start in its Ray actor. Those subprocesses write to the actor's
stdout (vLLM's logger) and stderr (tracebacks), which Ray keeps in the actor's log files, so on failure
what was written since the start is read back, and its first error line is the root cause. It is raised as an `EngineStartError` whose message
carries a marker; `start_failure_in` finds that line again in whatever Ray made of the exception by the
time it reaches the driver. The full traces stay in Ray's log files.
"""
from __future__ import annotations

import contextlib
import os
import re
from typing import Iterator, Optional

MARKER = "vLLM engine failed to start: "
# A Python exception line, e.g. "RuntimeError: start (0) + length (128) exceeds dimension size (127)."
_EXCEPTION_LINE = re.compile(r"\b((?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit)): (\S.*)$")
# vLLM's own summaries of a failure whose cause was logged before them: never the root cause.
_GENERIC = ("Engine core initialization failed", "EngineCore failed to start", "See root cause above")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_READ_LIMIT = 4 << 20


class EngineStartError(RuntimeError):
    """The engine did not start; the message is vLLM's root error."""


@contextlib.contextmanager
def explain_start_failure() -> Iterator[None]:
    """Around an engine's start in its actor: a failure is re-raised as an EngineStartError naming the
    first error that the engine's processes logged meanwhile (else the exception itself)."""
    logs = {path: os.path.getsize(path) for path in _output_files()}
    try:
        yield
    except Exception as exc:
        causes = (root_cause(_read_from(path, offset)) for path, offset in logs.items())
        cause = next((c for c in causes if c), None)
        raise EngineStartError(MARKER + (cause or f"{type(exc).__name__}: {exc}")) from exc


def root_cause(log_text: str) -> Optional[str]:
    """The first exception line of a log that is not one of vLLM's summaries, as `Type: message`."""
    for line in log_text.splitlines():
        found = _EXCEPTION_LINE.search(_ANSI.sub("", line))
        if found and not any(generic in found.group(2) for generic in _GENERIC):
            return f"{found.group(1)}: {found.group(2).strip()}"
    return None


def start_failure_in(exc: BaseException) -> Optional[str]:
    """The root error carried by an EngineStartError somewhere in `exc` (its text, causes or contexts), or
    None when the exception is not an engine start failure."""
    seen: set[int] = set()
    pending: list[Optional[BaseException]] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        text = _ANSI.sub("", str(current))
        if MARKER in text:
            return text[text.index(MARKER) + len(MARKER):].splitlines()[0].strip()
        pending += [current.__cause__, current.__context__, getattr(current, "cause", None)]
    return None


def _output_files() -> list[str]:
    """The files this process's stdout and stderr go to (a Ray worker's logs), in that order; none when
    they are terminals or pipes."""
    files = []
    for fd in (1, 2):
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if os.path.isfile(path) and path not in files:
            files.append(path)
    return files


def _read_from(path: str, offset: int) -> str:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(_READ_LIMIT).decode("utf-8", "replace")
