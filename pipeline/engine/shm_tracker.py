"""The engine actor's multiprocessing resource tracker, started where Ray's exit does not kill it.

vLLM's engine core and its Worker are spawned processes that create shared memory (`/psm_*`) and
semaphores (`/mp-*`), each registered with one CPython resource tracker: the process whose pipe spawned
children inherit from the engine actor, started by multiprocessing as the actor's own child when the actor
first needs one (at the latest when it spawns the engine core). When Ray Data drops an engine actor at the
end of a job, Ray (2.60, core worker exit) SIGKILLs every direct child of the actor *before* it calls the
actor's `__ray_shutdown__`, where vLLM's own shutdown runs: the tracker and the engine core die at once.
The Worker, a grandchild, survives, shuts down after its parent's death and unlinks its segments; it finds
the tracker dead ("resource_tracker: process died unexpectedly, relaunching"), starts a new one, and that
one has never seen those names: it prints a `KeyError: '/psm_...'` traceback for each. The engine core's
own segments, registered in the killed tracker, stayed in /dev/shm for good.

`start_detached_tracker` starts the tracker before vLLM does, through a shell that exits at once, so the
tracker is not the actor's child and Ray's kill does not reach it. It serves every engine process until
the last one closes its pipe: the Worker unregisters in the tracker that registered its segments, and what
the killed engine core left registered is unlinked by the tracker (which says so in a one-line
"leaked ... objects to clean up" warning) instead of staying in /dev/shm. The engine core is still killed
before vLLM's shutdown: Ray offers no hook before that kill, and turning the kill off would leave an
engine core running on its GPU whenever an actor is force-killed.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
from multiprocessing import resource_tracker, spawn, util

logger = logging.getLogger(__name__)


def start_detached_tracker() -> bool:
    """In an engine actor, before vLLM starts: this process's resource tracker, not as its child.

    Returns False (and leaves things as they are) when this process already has a tracker."""
    tracker = resource_tracker._resource_tracker
    with tracker._lock:
        if tracker._fd is not None:
            return False
        read_end, write_end = os.pipe()
        command = [spawn.get_executable(), *util._args_from_interpreter_flags(), "-c",
                   f"from multiprocessing.resource_tracker import main;main({read_end})"]
        # As ResourceTracker.ensure_running does: SIGINT/SIGTERM blocked until the tracker ignores them.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            # `sh` starts the tracker in the background and exits: the tracker is reparented away from
            # this process, so Ray's kill of this actor's children at exit does not reach it.
            subprocess.run(["/bin/sh", "-c", '"$@" &', "sh", *command], pass_fds=(read_end,),
                           stdin=subprocess.DEVNULL, check=True)
        except BaseException:
            os.close(write_end)
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
            os.close(read_end)
        # What a spawned child does with the tracker it inherits (multiprocessing.spawn.spawn_main): only
        # the pipe is known, no pid to wait for.
        tracker._fd, tracker._pid = write_end, None
    logger.debug("resource tracker started outside this process's children")
    return True
