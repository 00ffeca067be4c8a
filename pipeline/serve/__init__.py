"""The online endpoint: the Ray Serve application (`app`), our ingress (`ingress`) with its request checks
(`guard`), HTTP middleware (`http`), rate limits (`limits`), errors (`errors`) and warm-up (`warmup`).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# `deploy/rayservice.yaml` names `pipeline.serve:app_builder`: the public import path of the application.
# Lazy, so that `import pipeline.serve.guard` (the ingress's pure checks) does not load Ray Serve.
_LAZY = {"app_builder": "pipeline.serve.app", "build_app": "pipeline.serve.app", "run_serve": "pipeline.serve.app"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pipeline.serve' has no attribute {name!r}")
