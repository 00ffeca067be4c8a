"""Let vLLM's Gemma 3 module import on a machine without torchvision (CPU test environments only).

Why: on this kind of CPU machine PyPI's torchvision is a CUDA build that cannot load beside the CPU
torch, so setup removes it. vLLM 0.29's ``gemma3_mm`` still imports
``transformers.models.gemma3.image_processing_gemma3``, which imports torchvision at top level.
This installs a ``.pth`` file into the venv; it runs at start-up of every interpreter of that venv (Ray
workers and vLLM's engine subprocesses included) and adds a meta-path finder that, only while
torchvision is absent, serves that module as an alias of the PIL backend
(``image_processing_pil_gemma3.Gemma3ImageProcessorPil``), which computes the same pixels.

Remove when: torchvision's CPU build is installable here (deployments take it from PyTorch's CPU
index and never need this file). It is never imported by the library.

Usage: python scripts/gemma3_no_torchvision_hook.py install   (with the venv's interpreter)
"""
import sys
import sysconfig
from pathlib import Path

HOOK_MODULE = "_gemma3_no_torchvision_hook"

HOOK_SOURCE = '''
import importlib.abc, importlib.machinery, importlib.util, sys

_TARGET = "transformers.models.gemma3.image_processing_gemma3"


class _PilAliasLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module):
        from transformers.models.gemma3 import image_processing_pil_gemma3 as pil
        for name, value in vars(pil).items():
            if not name.startswith("__"):
                setattr(module, name, value)
        module.Gemma3ImageProcessor = pil.Gemma3ImageProcessorPil


class _PilAliasFinder(importlib.abc.MetaPathFinder):
    torchvision_present = None

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TARGET:
            return None
        if self.torchvision_present is None:
            type(self).torchvision_present = importlib.util.find_spec("torchvision") is not None
        if self.torchvision_present:
            return None
        return importlib.machinery.ModuleSpec(fullname, _PilAliasLoader())


def install():
    if not any(isinstance(f, _PilAliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PilAliasFinder())
'''


def install() -> Path:
    site_packages = Path(sysconfig.get_paths()["purelib"])
    (site_packages / f"{HOOK_MODULE}.py").write_text(HOOK_SOURCE)
    pth = site_packages / f"zz{HOOK_MODULE}.pth"
    pth.write_text(f"import {HOOK_MODULE}; {HOOK_MODULE}.install()\n")
    return pth


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        sys.exit(__doc__)
    print("installed", install())
