"""An engine start failure in one line: the root error found in what the engine's processes logged."""
import subprocess
import sys
import textwrap

from pipeline.engine.start import EngineStartError, MARKER, root_cause, start_failure_in

# Cut from a real failed start of vLLM CPU on a checkpoint with one tensor of the wrong shape (Ray
# forwards each subprocess's lines with a prefix and colours).
VLLM_LOG = textwrap.dedent("""\
    \x1b[36m(MapWorker pid=9305)\x1b[0m INFO 12-02 23:33:10 [cpu_worker.py:88] Loading model
    \x1b[36m(MapWorker pid=9305)\x1b[0m (Worker pid=12040) ERROR 12-02 23:33:22 [multiproc_executor.py:944] Traceback (most recent call last):
    \x1b[36m(MapWorker pid=9305)\x1b[0m (Worker pid=12040) ERROR 12-02 23:33:22 [multiproc_executor.py:944] RuntimeError: start (0) + length (128) exceeds dimension size (127).
    \x1b[36m(MapWorker pid=9305)\x1b[0m (EngineCore pid=11800) ERROR 12-02 23:33:23 [core.py:1101] EngineCore failed to start.
    \x1b[36m(MapWorker pid=9305)\x1b[0m RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
    """)


def test_root_cause_is_the_first_real_error_not_vllms_summary():
    assert root_cause(VLLM_LOG) == "RuntimeError: start (0) + length (128) exceeds dimension size (127)."
    assert root_cause("RuntimeError: Engine core initialization failed. See root cause above.") is None
    assert root_cause("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB") == \
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"


def test_the_line_survives_rays_wrapping():
    class ActorDied(Exception):  # Ray's errors keep the creation task's error as text, and as `.cause`
        def __init__(self, text, cause=None):
            super().__init__(text)
            self.cause = cause

    inner = EngineStartError(MARKER + "ValueError: bad shape")
    wrapped = ActorDied(f"The actor died because of an error raised in its creation task\n{inner}\nTraceback ...")
    assert start_failure_in(wrapped) == "ValueError: bad shape"
    assert start_failure_in(ActorDied("outer", cause=inner)) == "ValueError: bad shape"
    try:
        try:
            raise inner
        except EngineStartError:
            raise RuntimeError("during shutdown")
    except RuntimeError as exc:
        assert start_failure_in(exc) == "ValueError: bad shape"
    assert start_failure_in(RuntimeError("an ordinary failure")) is None


def test_explain_reads_what_the_engines_subprocesses_logged(tmp_path):
    """As in a Ray actor: stdout and stderr are files, and the engine's subprocess writes the real error
    there before the starting process sees only vLLM's summary."""
    code = textwrap.dedent("""\
        import subprocess, sys
        print("INFO an earlier line: ValueError: from before the start", flush=True)
        from pipeline.engine.start import explain_start_failure, EngineStartError
        try:
            with explain_start_failure():
                subprocess.run([sys.executable, "-c",
                                "print('ERROR [core.py:1] KeyError: missing tensor language_model.x', flush=True)"])
                raise RuntimeError("Engine core initialization failed. See root cause above.")
        except EngineStartError as exc:
            sys.stderr.write("CAUGHT " + str(exc) + "\\n")
        """)
    out, err = tmp_path / "worker.out", tmp_path / "worker.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        subprocess.run([sys.executable, "-c", code], stdout=stdout, stderr=stderr, timeout=60, check=True)
    assert f"CAUGHT {MARKER}KeyError: missing tensor language_model.x" in err.read_text()


def test_engine_death_at_shutdown_is_not_logged_as_an_error():
    """vLLM's AsyncLLM logs "output_handler failed" with an EngineDeadError when its engine core stops
    before the handler is cancelled: at our shutdown that is expected; before it, it is a real error."""
    import logging

    from vllm.v1.engine.exceptions import EngineDeadError

    from pipeline.stages import crash_isolation as faults

    faults.quiet_engine_shutdown()
    vllm_logger = logging.getLogger("vllm.v1.engine.async_llm")
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record)

    def handler_fails():
        try:
            raise EngineDeadError()
        except EngineDeadError:
            vllm_logger.exception("AsyncLLM output_handler failed.")

    keep = Keep()
    vllm_logger.addHandler(keep)
    try:
        handler_fails()
        assert len(seen) == 1, "a dead engine while running is logged"
        faults._ENGINE_SHUTTING_DOWN.set()
        handler_fails()
        assert len(seen) == 1, "at shutdown it is not"
    finally:
        faults._ENGINE_SHUTTING_DOWN.clear()
        vllm_logger.removeHandler(keep)
