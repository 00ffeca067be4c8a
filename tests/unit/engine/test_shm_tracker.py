"""pipeline.engine.shm_tracker: the engine actor's resource tracker outlives Ray's kill of the actor's children.

No vLLM or Ray here: a script plays the engine actor with the same process shape and the same exit
order. It spawns an "engine core" child, which spawns a "worker" grandchild; both create shared memory
(registered with the actor's tracker through the pipe spawn hands down). Then the script SIGKILLs every
direct child of its own, as Ray's core worker does when an actor exits (kill_child_processes_on_worker_exit,
before `__ray_shutdown__`), and the orphaned worker unlinks its segment, as vLLM's Worker does when its
parent is gone. The real `multiprocessing` resource tracker and real POSIX shared memory throughout.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

ACTOR = textwrap.dedent('''
    import os, signal, sys, time
    from multiprocessing import get_context, shared_memory

    def worker(names_file, done_file):
        segment = shared_memory.SharedMemory(create=True, size=4096)
        with open(names_file, "a") as names:
            names.write(segment.name + "\\n")
        parent = os.getppid()
        while os.getppid() == parent:  # until the "engine core" is killed
            time.sleep(0.05)
        segment.close()
        segment.unlink()  # unregisters, in whatever tracker this process finds alive
        open(done_file, "w").close()

    def engine_core(names_file, done_file):
        segment = shared_memory.SharedMemory(create=True, size=4096)
        with open(names_file, "a") as names:
            names.write(segment.name + "\\n")
        get_context("spawn").Process(target=worker, args=(names_file, done_file)).start()
        time.sleep(600)  # killed long before

    def children():
        """Processes whose parent is this one, from /proc, as Ray's GetAllProcsWithPpid finds them."""
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == os.getpid():
                        found.append(int(pid))
            except OSError:
                pass
        return found

    if __name__ == "__main__":
        detached, names_file, done_file = sys.argv[1] == "detached", sys.argv[2], sys.argv[3]
        if detached:
            from pipeline.engine.shm_tracker import start_detached_tracker
            assert start_detached_tracker()
        get_context("spawn").Process(target=engine_core, args=(names_file, done_file)).start()
        deadline = time.monotonic() + 120
        while len(open(names_file).read().split()) < 2:
            assert time.monotonic() < deadline, "segments never created"
            time.sleep(0.05)
        # Ray's exit of an actor: SIGKILL to every direct child of the actor's process.
        killed = children()
        assert len(killed) == (1 if detached else 2), killed  # the engine core (and the tracker)
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        while not os.path.exists(done_file):
            assert time.monotonic() < deadline, "the worker never finished"
            time.sleep(0.05)
''')


def run_actor(tmp_path: Path, mode: str) -> tuple[str, list[str]]:
    """The actor script's stderr (its children's and trackers' too) and the segments' names."""
    script = tmp_path / "actor.py"
    script.write_text(ACTOR)
    names, done = tmp_path / "names", tmp_path / "done"
    names.write_text("")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(script), mode, str(names), str(done)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    return result.stderr, names.read_text().split()


def wait_unlinked(names: list[str], timeout_s: float = 30) -> list[str]:
    """Those of the segments still in /dev/shm once the trackers had time to exit."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        left = [name for name in names if Path("/dev/shm", name.lstrip("/")).exists()]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def test_detached_tracker_outlives_the_kill_of_the_actors_children(tmp_path):
    stderr, names = run_actor(tmp_path, "detached")
    assert "Traceback" not in stderr and "KeyError" not in stderr, stderr
    assert "died unexpectedly" not in stderr, stderr
    # The worker's segment was unlinked by the worker; the killed engine core's by the tracker at its end
    # (with the tracker's own warning, not a traceback), where it used to stay in /dev/shm.
    assert "There appear to be 1 leaked shared_memory objects to clean up" in stderr, stderr
    assert wait_unlinked(names) == []


def test_control_a_tracker_that_is_the_actors_child_dies_with_it(tmp_path):
    """Without the fix, the same exit prints the KeyError traceback of issue 20 and leaks the killed
    process's segment: the scenario above is the real one."""
    stderr, names = run_actor(tmp_path, "child")
    try:
        assert "resource_tracker: process died unexpectedly, relaunching" in stderr, stderr
        assert "Traceback" in stderr and f"KeyError: '/{names[1]}'" in stderr, stderr
        assert wait_unlinked(names, timeout_s=2) == [names[0]], "the engine core's segment is left behind"
    finally:
        for name in names:
            Path("/dev/shm", name.lstrip("/")).unlink(missing_ok=True)
