#!/usr/bin/env bash
# Drive the GPU benchmark on the lent machine (see docs/performance.md, "How it was run").
#   bench/gpu_session.sh part FILE...    copy wheel parts (and MANIFEST, unpack.sh) into /tmp/gpu-parts
#   bench/gpu_session.sh start [ARGS]    unpack wheels, install this package, start the orchestrator detached
#   bench/gpu_session.sh poll SECONDS    wait (keeping the lease busy), then copy results and logs to $OUT
#   bench/gpu_session.sh queue LANE RUN[,RUN...]   add runs to a lane's queue while the orchestrator works
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BENCH=${BENCH:-/tmp/bench}
export PYTHONPATH=/tmp/site:$ROOT PATH=/tmp/site/bin:$PATH
# Nothing outside the machine can be reached: no hub, no usage reporting.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 RAY_USAGE_STATS_ENABLED=0 DO_NOT_TRACK=1
# NVLink multicast stays off on shared hosts (library device/KINDS.md): NCCL, torch symmetric memory and
# vLLM's symmetric-memory all-reduce (which would ask for it) are told so in every process we start.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 VLLM_ALLREDUCE_USE_SYMM_MEM=0
# FlashInfer all-reduce: never its MNNVL (multicast) backend; the fused pass is also off per run (bench/gpu_throughput.py).
export VLLM_ALLREDUCE_USE_FLASHINFER=0 VLLM_FLASHINFER_ALLREDUCE_BACKEND=trtllm
case "${1:-}" in
  part)
    shift
    mkdir -p /tmp/gpu-parts && cp "$@" /tmp/gpu-parts/ && ls -la /tmp/gpu-parts | tail -n +2 ;;
  start)
    shift
    if [ ! -f /tmp/site/.unpacked ]; then
      bash /tmp/gpu-parts/unpack.sh /tmp/gpu-parts > /tmp/unpack.log 2>&1 || { tail -20 /tmp/unpack.log; exit 1; }
      touch /tmp/site/.unpacked
    fi
    # Our package is imported from $ROOT (on PYTHONPATH); vLLM finds its plugin through this entry point,
    # in every process it starts, without a build or any change to the image's packages.
    DIST=/tmp/site/gemma3_fp8_pipeline-0.1.0.dist-info
    mkdir -p $DIST
    printf 'Metadata-Version: 2.1\nName: gemma3-fp8-pipeline\nVersion: 0.1.0\n' > $DIST/METADATA
    printf '[vllm.general_plugins]\ngemma3_fast_images = pipeline.engine.plugin:register\n' > $DIST/entry_points.txt
    python3 -c "import vllm, ray, pipeline.engine.plugin; print('vllm', vllm.__version__, 'ray', ray.__version__)" || exit 1
    mkdir -p $BENCH
    cd "$ROOT"
    setsid nohup python3 -m bench.gpu_throughput --workdir $BENCH --results $BENCH/results.json "$@" \
      > $BENCH/orchestrator.log 2>&1 < /dev/null &
    echo $! > $BENCH/orchestrator.pid
    echo "orchestrator pid $!"
    sleep 20; tail -5 $BENCH/orchestrator.log ;;
  poll)
    end=$((SECONDS + ${2:-300}))
    while [ $SECONDS -lt $end ]; do
      kill -0 "$(cat $BENCH/orchestrator.pid 2>/dev/null)" 2>/dev/null || break
      # Results so far, every 10 s: if the lease ends during this call, what is under $OUT still comes back.
      cp $BENCH/results.json "${OUT:-/tmp}/" 2>/dev/null
      sleep 10
    done
    nvidia-smi --query-gpu=name,utilization.gpu,memory.used --format=csv,noheader
    cp $BENCH/results.json $BENCH/orchestrator.log "${OUT:-/tmp}/" 2>/dev/null
    # One archive of run logs and profiler outputs (the tool returns at most 8 files of 16 MiB).
    # Profiler traces of a whole wave run to tens of MB: they stay there (their breakdown is in the results).
    (cd $BENCH && find . -maxdepth 2 \( \( -name "*.log" -size -40M \) -o \( -path "./profile-*/*" -size -6M \) \
      -o \( -path "./stacks/*" -size -40M \) \) -print0 \
      | tar --null -czf "${OUT:-/tmp}/bench-logs.tar.gz" -T - 2>/dev/null)
    ls -la "${OUT:-/tmp}/"
    tail -25 $BENCH/orchestrator.log ;;
  queue)
    # Appended under the orchestrator's nose: a lane reads its queue file before each run (RunQueue).
    # Names are checked here first, so a typo fails now and not when the lane reaches it.
    cd "$ROOT" && ${PYTHON:-python3} -c "import sys; from bench.gpu_throughput import parse_lanes; parse_lanes(sys.argv[1])" "$3" || exit 1
    echo "$3" | tr ',' '\n' | flock $BENCH/lane-$2.queue -c "cat >> $BENCH/lane-$2.queue"
    echo "lane $2 queue:"; cat $BENCH/lane-$2.queue ;;
  job)
    # The job-level benchmark (bench/job_run.py, issue steady) on a one-GPU machine, from the kit that
    # `bench/online_gpu_session.sh kit` builds here (our wheel from HEAD, bench/ and configs/):
    #   job stage   (carry .gpu/kit .gpu/parts/part-01) the online script's stage: kit and first part to
    #               /tmp, the 12B-shaped FP8 checkpoint built detached; here also the datasets, detached,
    #               if the image's Python can already write them (else `job start` writes them)
    #   job part    (carry .gpu/parts/part-NN) copy that part
    #   job start [ARGS]   unpack, pip-install our wheel, wait for the checkpoint and the datasets, start
    #               bench.job_run detached (ARGS go to it, after the defaults below)
    #   job poll SECONDS   wait for it (keeping the lease busy), copy results and logs to $OUT
    shift
    J=/tmp/jobrun; KIT=/tmp/kit; mkdir -p $J
    export PYTHONPATH=$KIT/root/bench/vllm_bridge:/tmp/site
    case "${1:-}" in
      stage)
        bash "$ROOT/bench/online_gpu_session.sh" stage || exit 1
        cd $KIT/root && setsid nohup env PYTHONPATH=$KIT/root python3 -m bench.job_data /tmp/jobdata \
          --w1 "${JOB_W1:-10000}" --w2 "${JOB_W2:-1000}" --workers 16 > $J/data.log 2>&1 < /dev/null &
        echo $! > $J/data.pid; sleep 5; cat $J/data.log ;;
      part)
        bash "$ROOT/bench/online_gpu_session.sh" part; tail -2 $J/data.log ;;
      start)
        shift
        bash "$ROOT/bench/online_gpu_session.sh" install || exit 1
        (cd $J && python3 -c "import vllm, ray, ray.data.llm, pipeline, jobs.caption; print('vllm', vllm.__version__, 'ray', ray.__version__, 'pipeline from', pipeline.__file__)") || exit 1
        for _ in $(seq 100); do
          grep -q "CHECKPOINT READY" /tmp/online/checkpoint.log && break
          grep -q "Traceback" /tmp/online/checkpoint.log && { tail -20 /tmp/online/checkpoint.log; exit 1; }; sleep 3
        done
        grep -q "CHECKPOINT READY" /tmp/online/checkpoint.log || { echo "no checkpoint after 300 s"; exit 1; }
        # A dataset writer started by `job stage` finishes first; one that failed there (no pyarrow in the
        # image) leaves the writing to bench.job_run, which reuses whatever workload is complete.
        while kill -0 "$(cat $J/data.pid 2>/dev/null)" 2>/dev/null; do sleep 2; done; tail -3 $J/data.log
        if kill -0 "$(cat $J/runner.pid 2>/dev/null)" 2>/dev/null; then echo "runner $(cat $J/runner.pid) still running"; exit 1; fi
        cd $KIT/root && setsid nohup python3 -m bench.job_run /tmp/online/gemma3-12b-fp8 --data /tmp/jobdata \
          --workdir $J --results $J/results.json --config configs/gpu-fp8.yaml --set runtime.local_num_cpus=16 \
          --w1 "${JOB_W1:-10000}" --w2 "${JOB_W2:-1000}" --workers 16 "$@" > $J/runner.log 2>&1 < /dev/null &
        echo $! > $J/runner.pid; echo "runner pid $!"; sleep 15; tail -5 $J/runner.log ;;
      poll)
        end=$((SECONDS + ${2:-300}))
        while [ $SECONDS -lt $end ]; do
          kill -0 "$(cat $J/runner.pid 2>/dev/null)" 2>/dev/null || break
          cp $J/results.json $J/runner.log "${OUT:-/tmp}/" 2>/dev/null
          sleep 5
        done
        cp $J/results.json $J/runner.log "${OUT:-/tmp}/" 2>/dev/null
        (cd $J && tar czf "${OUT:-/tmp}/job-logs.tar.gz" *.log 2>/dev/null)
        nvidia-smi --query-gpu=name,utilization.gpu,memory.used --format=csv,noheader
        grep -v "^\s*$" $J/runner.log | tail -30 ;;
      *) echo "usage: $0 job stage | part | start [ARGS] | poll SECONDS" >&2; exit 2 ;;
    esac ;;
  *) echo "usage: $0 part FILE | start [ARGS] | poll SECONDS | queue LANE RUN[,RUN...] | job stage|part|start|poll" >&2; exit 2 ;;
esac
