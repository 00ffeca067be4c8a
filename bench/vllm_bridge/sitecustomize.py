"""Benchmark-only bridge: lets Ray 2.60's `ray.serve.llm` import with vLLM 0.26 (the GPU image's newest).

Production pins vLLM 0.29, the release Ray 2.60's LLM code is written for. The lent GPU machine's torch
(2.11) takes vLLM 0.26 at most, and there `import ray.serve.llm` fails. A static check of every
`from vllm... import` in ray/llm against the vLLM 0.26 wheel finds exactly three differences, all
moves or additions between 0.26 and 0.29 (see docs/performance.md, "The online endpoint on an H200"):

    ray/llm imports                                       vLLM 0.26 has it at / as
    vllm.entrypoints.serve.engine.protocol.ErrorResponse,  vllm.entrypoints.openai.engine.protocol
      ErrorInfo
    vllm.entrypoints.launchers.cli_args.FrontendArgs       vllm.entrypoints.openai.cli_args
    vllm.exceptions.VLLMClientError (base of 4xx errors)   no such base: VLLMValidationError and
                                                           VLLMUnprocessableEntityError are ValueErrors
                                                           (Ray catches ValueError too), VLLMNotFoundError
                                                           is the one 4xx error left, so it stands in

Our own tool parser (pipeline/tools), written against vLLM 0.29, needs two more (found on the H200:
without them Ray's replica failed with "tool_parser 'gemma3' has not been registered"):

    vllm.entrypoints.generate.base.protocol.DeltaMessage,  vllm.entrypoints.openai.engine.protocol
      ToolCall, ... (the tool-call protocol models)
    vllm.tool_parsers.utils.escape_ctrl_chars_in_strings   absent: vLLM 0.29's function, copied below

Python imports `sitecustomize` at start-up from sys.path, so with this folder on PYTHONPATH the bridge is
in every process: the driver, Ray Serve's replicas and vLLM's engine processes. It imports nothing at
start-up. An import hook only answers for the two missing module names, after every real finder has
failed (so with vLLM 0.29, where they exist, it never acts), and adds VLLMClientError to vllm.exceptions
only if that module lacks it. Nothing here is part of the package; production never loads it.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

# module ray/llm imports -> where vLLM 0.26 defines the same names
ALIASES = {
    "vllm.entrypoints.serve.engine.protocol": "vllm.entrypoints.openai.engine.protocol",
    "vllm.entrypoints.launchers.cli_args": "vllm.entrypoints.openai.cli_args",
    "vllm.entrypoints.generate.base.protocol": "vllm.entrypoints.openai.engine.protocol",
}
# packages that do not exist at all in vLLM 0.26 (an empty package holds the alias above)
PACKAGES = {"vllm.entrypoints.launchers"}


def add_client_error(module: types.ModuleType) -> None:
    """vLLM 0.29's base of request errors, on a vllm.exceptions that predates it."""
    if not hasattr(module, "VLLMClientError") and hasattr(module, "VLLMNotFoundError"):
        module.VLLMClientError = module.VLLMNotFoundError


def escape_ctrl_chars_in_strings(text: str) -> str:
    """Escape literal newlines, CRs, tabs and NULs inside the string literals of pythonic text, so that
    ast.parse reads a call whose string argument holds them. Copied from vLLM 0.29
    (vllm/tool_parsers/utils.py, Apache-2.0)."""
    out: list[str] = []
    quote: str | None = None
    index, length = 0, len(text)
    while index < length:
        char = text[index]
        if quote is None:
            if char in {"'", '"'}:
                quote = char
            out.append(char)
        elif char == "\\" and index + 1 < length:
            out.append(char)
            out.append(text[index + 1])
            index += 2
            continue
        elif char == quote:
            quote = None
            out.append(char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\r":
            out.append("\\r")
        elif char == "\t":
            out.append("\\t")
        elif char == "\x00":
            out.append("\\x00")
        else:
            out.append(char)
        index += 1
    return "".join(out)


def add_escape_ctrl_chars(module: types.ModuleType) -> None:
    if not hasattr(module, "escape_ctrl_chars_in_strings"):
        module.escape_ctrl_chars_in_strings = escape_ctrl_chars_in_strings


# real vLLM modules that get a missing name added right after they load
PATCHES = {"vllm.exceptions": add_client_error, "vllm.tool_parsers.utils": add_escape_ctrl_chars}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str | None):
        self.target = target

    def create_module(self, spec):
        if self.target is None:  # a package that only holds aliases
            module = types.ModuleType(spec.name)
            module.__path__ = []
            return module
        return importlib.import_module(self.target)  # the same module object under a second name

    def exec_module(self, module):
        pass


class _PatchingLoader(importlib.abc.Loader):
    """vLLM's own loader for the module, then its PATCHES entry."""

    def __init__(self, loader, patch):
        self.loader, self.patch = loader, patch

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        self.patch(module)

    def __getattr__(self, name):  # get_code, get_source, is_package ... of the real loader
        return getattr(self.loader, name)


class MovedModules(importlib.abc.MetaPathFinder):
    """Last on sys.meta_path: only names no real finder found."""

    def find_spec(self, name, path=None, target=None):
        if name in ALIASES or name in PACKAGES:
            return importlib.util.spec_from_loader(name, _AliasLoader(ALIASES.get(name)),
                                                   is_package=name in PACKAGES)
        return None


class PatchedModules(importlib.abc.MetaPathFinder):
    """First on sys.meta_path, for the PATCHES modules alone: the real file, then the patch."""

    def find_spec(self, name, path=None, target=None):
        if name not in PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader, PATCHES[name])
        return spec


def install() -> None:
    if not any(isinstance(f, MovedModules) for f in sys.meta_path):
        sys.meta_path.append(MovedModules())
        sys.meta_path.insert(0, PatchedModules())
    for name, patch in PATCHES.items():  # imported before the hook: patch in place
        if name in sys.modules:
            patch(sys.modules[name])


def _chain_next_sitecustomize() -> None:
    """Run the sitecustomize this one shadows, if the interpreter has one further down sys.path."""
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


if __name__ == "sitecustomize":
    install()
    _chain_next_sitecustomize()
