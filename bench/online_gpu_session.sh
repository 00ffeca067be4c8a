#!/usr/bin/env bash
# Drive the online benchmark (bench/online_gpu.py) on the lent one-GPU machine, from a kit built here:
#   .gpu/kit/wheel/*.whl   this package as a wheel (python -m pip wheel --no-deps), installed there with pip
#   .gpu/kit/root/         bench/ and configs/ of the same commit (bench/ is not part of the wheel)
#   .gpu/parts/part-NN     the vLLM 0.26 + Ray 2.60 wheel parts, one per call (the 64 MiB limit)
#
#   bench/online_gpu_session.sh kit             (here, before the lease) build .gpu/kit from the committed HEAD
#                                               (wheel) and this checkout's bench/ and configs/
#   bench/online_gpu_session.sh stage           (first call, carry .gpu/kit and .gpu/parts/part-01) copy the kit and
#                                               the part to /tmp, build the 12B-shaped checkpoints detached
#   bench/online_gpu_session.sh part            (carry .gpu/parts/part-NN) copy that part to /tmp/gpu-parts
#   bench/online_gpu_session.sh install         unpack the wheels once, pip-install our wheel (start does it)
#   bench/online_gpu_session.sh start [ARGS]    unpack the wheels, pip-install our wheel, check the imports,
#                                               start bench.online_gpu detached (ARGS go to it)
#   bench/online_gpu_session.sh poll SECONDS    wait for it (keeping the lease busy), copy results to $OUT
#
# Everything runs from copies under /tmp: a later call replaces the carried folders under the checkout.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
W=/tmp/online
KIT=/tmp/kit
# The bridge's sitecustomize (bench/vllm_bridge) first: every Python process started below, Ray's and
# vLLM's included, gets the import hook that lets Ray 2.60's ray.serve.llm import with vLLM 0.26.
export PYTHONPATH=$KIT/root/bench/vllm_bridge:/tmp/site PATH=/tmp/site/bin:$PATH
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 RAY_USAGE_STATS_ENABLED=0 DO_NOT_TRACK=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 VLLM_ALLREDUCE_USE_SYMM_MEM=0
mkdir -p $W /tmp/gpu-parts
case "${1:-}" in
  stage)
    rm -rf $KIT && cp -r "$ROOT/.gpu/kit" $KIT
    cp -u "$ROOT"/.gpu/parts/* /tmp/gpu-parts/ 2>/dev/null
    ls -la /tmp/gpu-parts | tail -n +2
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader
    python3 -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__)"
    python3 -c "import sitecustomize; print('sitecustomize:', sitecustomize.__file__)"
    # The checkpoint needs only the image's torch/transformers: built while the parts are still arriving.
    # tiny_gemma3.py is loaded by path (the package's __init__ needs pydantic, which comes with the parts).
    cd $KIT/root && setsid nohup env PYTHONPATH=$KIT/root/ckpt:$KIT/root python3 -c "
import importlib.util, time, sys
spec = importlib.util.spec_from_file_location('tg', sys.argv[1]); tg = sys.modules['tg'] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tg)
from bench.fp8_checkpoint import convert
t = time.time(); tg.build_gemma3('$W/gemma3-12b-bf16', tg.SHAPES['12b'], device='cuda')
print('bf16 built in', round(time.time() - t), 's', flush=True)
print('fp8', convert('$W/gemma3-12b-bf16', '$W/gemma3-12b-fp8', device='cuda'), flush=True)
import shutil; shutil.rmtree('$W/gemma3-12b-bf16'); print('CHECKPOINT READY', flush=True)
" $KIT/root/tiny_gemma3.py > $W/checkpoint.log 2>&1 < /dev/null &
    sleep 5; cat $W/checkpoint.log ;;
  kit)
    # The wheel from HEAD, not the working tree: what runs on the card is a commit.
    rm -rf "$ROOT/.gpu/kit" /tmp/kit-src && mkdir -p "$ROOT/.gpu/kit/wheel" "$ROOT/.gpu/kit/root" /tmp/kit-src
    git -C "$ROOT" archive HEAD | tar -x -C /tmp/kit-src
    "${PYTHON:-$ROOT/.venv/bin/python}" -m pip wheel -q --no-deps --no-build-isolation -w "$ROOT/.gpu/kit/wheel" /tmp/kit-src || exit 1
    cp -r "$ROOT/bench" "$ROOT/configs" "$ROOT/.gpu/kit/root/"
    cp "$ROOT/pipeline/testing/tiny_gemma3.py" "$ROOT/.gpu/kit/root/"
    # tiny_gemma3 imports pipeline.engine.checkpoint_layout (stdlib only): a bare copy under ckpt/ lets the
    # checkpoint build run before the parts (pydantic, which pipeline/__init__ needs) have arrived.
    mkdir -p "$ROOT/.gpu/kit/root/ckpt/pipeline/engine"
    touch "$ROOT/.gpu/kit/root/ckpt/pipeline/__init__.py" "$ROOT/.gpu/kit/root/ckpt/pipeline/engine/__init__.py"
    cp "$ROOT/pipeline/engine/checkpoint_layout.py" "$ROOT/.gpu/kit/root/ckpt/pipeline/engine/"
    find "$ROOT/.gpu/kit" -name __pycache__ -prune -exec rm -rf {} +
    git -C "$ROOT" rev-parse HEAD > "$ROOT/.gpu/kit/COMMIT"; du -sh "$ROOT/.gpu/kit"; ls "$ROOT/.gpu/kit/wheel" ;;
  part)
    cp -u "$ROOT"/.gpu/parts/* /tmp/gpu-parts/ && ls /tmp/gpu-parts | tr '\n' ' '; echo
    tail -3 $W/checkpoint.log ;;
  install)
    # A kit carried again with this call (runner fixes made while the parts travelled) replaces the staged one.
    [ -d "$ROOT/.gpu/kit/wheel" ] && rm -rf $KIT && cp -r "$ROOT/.gpu/kit" $KIT
    if [ ! -f /tmp/site/.unpacked ]; then
      bash /tmp/gpu-parts/unpack.sh /tmp/gpu-parts > $W/unpack.log 2>&1 || { tail -20 $W/unpack.log; exit 1; }
      touch /tmp/site/.unpacked
    fi
    # Our package, from its wheel: its vllm.general_plugins entry points are what vLLM finds.
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      $KIT/wheel/*.whl ;;
  start)
    shift
    bash "$0" install || exit 1
    cd $W && python3 - <<'EOF' || exit 1
import importlib.metadata as md, sys
import vllm, ray, ray.serve.llm, pipeline, jobs.serve
print("vllm", vllm.__version__, "ray", ray.__version__, "pipeline from", pipeline.__file__)
print("plugins:", sorted(f"{e.name}={e.value}" for e in md.entry_points(group="vllm.general_plugins")))
print("sitecustomize:", sys.modules["sitecustomize"].__file__)
EOF
    tail -2 $W/checkpoint.log
    for _ in $(seq 100); do
      grep -q "CHECKPOINT READY" $W/checkpoint.log && break
      grep -q "Traceback" $W/checkpoint.log && { tail -20 $W/checkpoint.log; exit 1; }; sleep 3
    done
    grep -q "CHECKPOINT READY" $W/checkpoint.log || { echo "no checkpoint after 300 s"; exit 1; }
    # One runner at a time: two would start two engines on the card (seen 2026-12-02: the second failed).
    if kill -0 "$(cat $W/runner.pid 2>/dev/null)" 2>/dev/null; then echo "runner $(cat $W/runner.pid) still running"; exit 1; fi
    cd $KIT/root && setsid nohup python3 -m bench.online_gpu $W/gemma3-12b-fp8 --workdir $W \
      --config $KIT/root/configs/gpu-fp8.yaml --results $W/results.json "$@" > $W/runner.log 2>&1 < /dev/null &
    echo $! > $W/runner.pid; echo "runner pid $!" ;;
  poll)
    end=$((SECONDS + ${2:-300}))
    while [ $SECONDS -lt $end ]; do
      # The runner's last line is "done"; kill -0 on its pid does not see it from a later call.
      tail -1 $W/runner.log 2>/dev/null | grep -qx done && break
      cp $W/results.json "${OUT:-/tmp}/" 2>/dev/null; cp $W/runner.log "${OUT:-/tmp}/" 2>/dev/null
      sleep 5
    done
    cp $W/results.json $W/runner.log "${OUT:-/tmp}/" 2>/dev/null
    (cd $W && tar czf "${OUT:-/tmp}/server-logs.tar.gz" server-*.log unpack.log checkpoint.log 2>/dev/null)
    nvidia-smi --query-gpu=name,utilization.gpu,memory.used --format=csv,noheader
    cat $W/runner.log | grep -v "^\s*$" | tail -40 ;;
  *) echo "usage: $0 kit | stage | part | install | start [ARGS] | poll SECONDS" >&2; exit 2 ;;
esac
