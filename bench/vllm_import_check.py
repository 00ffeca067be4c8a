"""Does every vLLM import of Ray's LLM code and of this package resolve in the vLLM that is installed?

    python -m bench.vllm_import_check [ROOT ...]

Reads every `from vllm... import NAME` and `import vllm...` (top level or inside functions) in the
given source folders (default: ray/llm and ray/serve/llm of the installed Ray, and pipeline/ and jobs/
of this package) and performs each one for real: the module is imported and each name looked up (as an
attribute, or as a submodule). Prints each failure with where it is written and exits 1 if any fails.

It is how the bridge in bench/vllm_bridge was found and is proved on a machine without a GPU: run it
with the vLLM 0.26 wheel's files on PYTHONPATH, once without and once with bench/vllm_bridge in front.
"""
from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path


def default_roots() -> list[Path]:
    import ray

    ray_dir = Path(ray.__file__).parent
    here = Path(__file__).resolve().parents[1]
    return [ray_dir / "llm", ray_dir / "serve" / "llm", here / "pipeline", here / "jobs"]


def vllm_imports(roots: list[Path]) -> dict[tuple[str, tuple[str, ...]], list[str]]:
    """(module, names) -> where it is written ("file:line")."""
    found: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            try:
                tree = ast.parse(path.read_text())
            except (SyntaxError, UnicodeDecodeError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                        and node.module.split(".")[0] == "vllm":
                    key = (node.module, tuple(a.name for a in node.names))
                elif isinstance(node, ast.Import):
                    modules = [a.name for a in node.names if a.name.split(".")[0] == "vllm"]
                    if not modules:
                        continue
                    key = (modules[0], ())
                else:
                    continue
                found.setdefault(key, []).append(f"{path.relative_to(root.parent)}:{node.lineno}")
    return found


def failures(imports: dict[tuple[str, tuple[str, ...]], list[str]]) -> list[str]:
    problems = []
    for (module_name, names), where in sorted(imports.items()):
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            problems.append(f"{module_name}: {type(exc).__name__}: {exc}  <- {where[0]}")
            continue
        for name in names:
            if name == "*" or hasattr(module, name):
                continue
            try:
                importlib.import_module(f"{module_name}.{name}")
            except ImportError:
                problems.append(f"{module_name}.{name}: missing  <- {where[0]}")
    return problems


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    roots = [Path(a) for a in argv] or default_roots()
    imports = vllm_imports(roots)
    import vllm

    problems = failures(imports)
    bridge = "sitecustomize" in sys.modules and "vllm_bridge" in (sys.modules["sitecustomize"].__file__ or "")
    print(f"vllm {vllm.__version__} from {vllm.__file__}; bridge {'on' if bridge else 'off'}; "
          f"{len(imports)} distinct vLLM imports in {', '.join(str(r) for r in roots)}")
    for problem in problems:
        print("  FAIL", problem)
    print(f"{len(problems)} failing")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
