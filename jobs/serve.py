"""Serve Gemma 3 as an OpenAI-compatible endpoint on Ray Serve until interrupted.

    GEMMA_API_KEYS=secret1,secret2 python -m jobs.serve --config configs/tiny-cpu.yaml --model work/tiny-gemma3
    python -m jobs.serve --config configs/gpu-fp8.yaml --set serve.host=0.0.0.0 --set serve.max_replicas=8

Clients use any OpenAI SDK: base_url http://HOST:PORT/v1, api_key one of the keys. The same app is
deployed declaratively with `serve run` / `serve deploy` and configs/serve*.yaml.

Exit codes: 0 stopped by Ctrl-C or SIGTERM, 2 invalid config, model or missing API keys.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import time

from pipeline.config import ConfigError, PipelineConfig

logger = logging.getLogger("jobs.serve")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("--model", help="checkpoint: local dir, s3:// prefix or Hugging Face id (model.source)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, e.g. serve.port=8080 (repeatable)")
    return parser.parse_args(argv)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipeline.engine.checkpoint import CheckpointError
    from pipeline.serve.app import run_serve

    overrides = list(args.overrides) + ([f"model.source={args.model}"] if args.model else [])
    # Installed right after ray.init, which puts in its own SIGTERM handler, and before the app deploys:
    # a SIGTERM at any point from then on stops like Ctrl-C, so Serve shuts down and an embedded Ray with
    # it (the endpoint can answer /ready before the deploy call has returned here).
    def stop_on_sigterm() -> None:
        signal.signal(signal.SIGTERM, _interrupt)

    try:
        try:
            config = PipelineConfig.load(args.config, overrides)
            run_serve(config, blocking=False, on_ray_ready=stop_on_sigterm)
        except (ConfigError, CheckpointError) as exc:
            logger.error("%s", exc)
            return 2
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        logger.info("stopping")
    import ray
    from ray import serve

    if ray.is_initialized():  # not when stopped before Ray started
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
