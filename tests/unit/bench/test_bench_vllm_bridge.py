"""The benchmark-only bridge (bench/vllm_bridge) against the installed, production vLLM.

With the pinned vLLM every import that Ray's LLM code and this package make resolves on its own, and the
bridge must then change nothing. Its copy of vLLM's escape_ctrl_chars_in_strings must compute the
function it stands in for. (That the bridge makes vLLM 0.26 import is shown by running
bench.vllm_import_check against that wheel's files; the wheel is not installed here.)
"""
from __future__ import annotations

import importlib.util
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
BRIDGE = ROOT / "bench" / "vllm_bridge" / "sitecustomize.py"


def load_bridge():
    spec = importlib.util.spec_from_file_location("vllm_bridge_under_test", BRIDGE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_vllm_import_resolves_with_the_pinned_vllm_and_the_bridge_stays_idle():
    # A fresh interpreter with the bridge on PYTHONPATH, as on the GPU machine.
    code = (
        "import sys, bench.vllm_import_check as c\n"
        "status = c.main([])\n"
        "import vllm.entrypoints.serve.engine.protocol as p, vllm.exceptions as e, vllm.tool_parsers.utils as u\n"
        "import sitecustomize as b\n"
        "assert p.__name__ == 'vllm.entrypoints.serve.engine.protocol', p.__name__\n"
        "assert e.VLLMClientError is not e.VLLMNotFoundError\n"
        "assert u.escape_ctrl_chars_in_strings is not b.escape_ctrl_chars_in_strings\n"
        "sys.exit(status)\n")
    env = {"PYTHONPATH": f"{BRIDGE.parent}:{ROOT}", "PATH": "/usr/bin:/bin", "HOME": str(Path.home()),
           "VLLM_NO_USAGE_STATS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "bridge on" in done.stdout and "0 failing" in done.stdout, done.stdout[-2000:]


def test_escape_copy_matches_vllm():
    from vllm.tool_parsers.utils import escape_ctrl_chars_in_strings as vllm_escape

    bridge = load_bridge()
    rng = random.Random(0)
    samples = ["f(a='x\ny')", "g(b=\"a\\\"\tc\", d='\x00')", "plain\ntext", ""]
    samples += ["".join(rng.choice("ab'\"\\\n\r\t\x00 (),=") for _ in range(rng.randint(0, 40)))
                for _ in range(2000)]
    for text in samples:
        assert bridge.escape_ctrl_chars_in_strings(text) == vllm_escape(text), repr(text)


def test_patch_adds_missing_names_only():
    import types

    bridge = load_bridge()
    old = types.ModuleType("old_exceptions")
    old.VLLMNotFoundError = type("VLLMNotFoundError", (Exception,), {})
    bridge.add_client_error(old)
    assert old.VLLMClientError is old.VLLMNotFoundError
    new = types.ModuleType("new_exceptions")
    new.VLLMNotFoundError, new.VLLMClientError = KeyError, LookupError
    bridge.add_client_error(new)
    assert new.VLLMClientError is LookupError
