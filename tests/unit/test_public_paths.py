"""The paths other programs name stay importable after a move: the Serve application of
deploy/rayservice.yaml (`pipeline.serve:app_builder`, resolved as Ray Serve resolves an import_path) and the
vLLM plugin entry points of the installed package (resolved as vLLM's plugin loader does). And importing
the endpoint's request guard does not load Ray: `pipeline.serve` re-exports the application lazily."""
import subprocess
import sys
from importlib import metadata

import yaml

from tests.conftest import ROOT


def test_rayservice_import_path_resolves_to_the_app_builder():
    manifest = yaml.safe_load((ROOT / "deploy" / "rayservice.yaml").read_text())
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    (application,) = serve_config["applications"]
    from ray._common.utils import import_attr

    from pipeline.serve.app import app_builder

    assert import_attr(application["import_path"]) is app_builder


def test_vllm_plugin_entry_points_load():
    plugins = {ep.name: ep for ep in metadata.entry_points(group="vllm.general_plugins")
               if ep.dist is not None and ep.dist.name == "gemma3-fp8-pipeline"}
    assert set(plugins) == {"gemma3_fast_images", "gemma3_tools"}
    assert all(ep.module == "pipeline.engine.plugin" and callable(ep.load()) for ep in plugins.values())


def test_request_guard_imports_without_ray():
    code = "import sys, pipeline.serve.guard, pipeline.openai.checks; print('ray' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.strip() == "False", result.stdout + result.stderr
