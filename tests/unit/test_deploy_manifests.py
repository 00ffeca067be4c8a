"""deploy/: KubeRay manifests (RayJob, RayCronJob, RayService) and their image. No cluster here, so the
structure and the fields that tie them to this project are checked: entrypoints that parse with our own
CLIs, a valid cron schedule, the Serve config in step with configs/serve.yaml, GPU workers from zero."""
import shlex
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from croniter import croniter

from jobs import caption, schedule
from pipeline.schedule import check_prefixes

ROOT = Path(__file__).resolve().parents[2]
IMAGE_ROOT = "/home/ray/gemma3-fp8-pipeline"


def load(name):
    return yaml.safe_load((ROOT / "deploy" / name).read_text())


def local_path(path: str) -> Path:
    """A path inside the image (deploy/Dockerfile copies the checkout to IMAGE_ROOT) in this checkout."""
    assert path.startswith(IMAGE_ROOT + "/"), path
    return ROOT / path[len(IMAGE_ROOT) + 1:]


def entrypoint_args(entrypoint: str, module: str) -> list[str]:
    words = shlex.split(entrypoint)
    assert words[:3] == ["python", "-m", module], words
    return words[3:]


def check_cluster(spec, min_gpu_workers=0):
    assert spec["rayVersion"] == metadata.version("ray")
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    (workers,) = spec["workerGroupSpecs"]
    assert workers["minReplicas"] == min_gpu_workers and workers["maxReplicas"] >= 2
    container = workers["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert workers["template"]["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"] == "g6e.12xlarge"
    images = {c["image"] for group in [head, workers] for c in group["template"]["spec"]["containers"]}
    assert images == {"gemma3-fp8-pipeline:0.1.0"}


def test_dockerfile_builds_on_the_ray_llm_image_of_our_pins():
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert f"FROM rayproject/ray-llm:{metadata.version('ray')}-py312-cu130" in text
    assert f"COPY --chown=ray:users . {IMAGE_ROOT}" in text and f"'{IMAGE_ROOT}[gpu]'" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "work" in ignored


def test_rayjob_runs_the_caption_job():
    job = load("rayjob-caption.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    args = caption.parse_args(entrypoint_args(job["spec"]["entrypoint"], "jobs.caption"))
    assert local_path(args.config).exists() and args.input[0].startswith("s3://") and args.output.startswith("s3://")
    assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["backoffLimit"] == 0
    check_cluster(job["spec"]["rayClusterSpec"])


def test_raycronjob_runs_one_schedule_tick():
    cron = load("raycronjob-schedule.yaml")
    assert (cron["apiVersion"], cron["kind"]) == ("ray.io/v1", "RayCronJob")
    assert croniter.is_valid(cron["spec"]["schedule"])
    template = cron["spec"]["jobTemplate"]
    args = schedule.parse_args(entrypoint_args(template["entrypoint"], "jobs.schedule"))
    assert args.once and not args.cron, "the RayCronJob is the scheduler; each RayJob runs one tick"
    assert not args.submit_to, "the tick captions on its own RayJob's cluster"
    assert local_path(args.config).exists() and args.max_files
    check_prefixes(args.input, args.output)
    check_cluster(template["rayClusterSpec"])


def test_rayservice_serves_configs_serve_yaml():
    service = load("rayservice.yaml")
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    served = yaml.safe_load(service["spec"]["serveConfigV2"])
    reference = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    (app,), (expected,) = served["applications"], reference["applications"]
    assert local_path(app["args"]["config"]) == ROOT / expected["args"]["config"]
    assert {**app, "args": {**app["args"], "config": None}} == {**expected, "args": {**expected["args"], "config": None}}
    assert served["http_options"] == reference["http_options"]
    check_cluster(service["spec"]["rayClusterConfig"], min_gpu_workers=1)
    for group in [service["spec"]["rayClusterConfig"]["headGroupSpec"], *service["spec"]["rayClusterConfig"]["workerGroupSpecs"]]:
        env = {e["name"]: e for e in group["template"]["spec"]["containers"][0]["env"]}
        assert env["GEMMA_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == "gemma-api-keys"


@pytest.mark.parametrize("name", ["rayjob-caption.yaml", "raycronjob-schedule.yaml", "rayservice.yaml"])
def test_manifests_are_single_documents(name):
    assert len(list(yaml.safe_load_all((ROOT / "deploy" / name).read_text()))) == 1
