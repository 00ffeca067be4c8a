"""deploy/: KubeRay manifests (RayJob, RayCronJob, RayService) and their image. No cluster here, so the
structure and the fields that tie them to this project are checked: entrypoints that parse with our own
CLIs, a valid cron schedule, the Serve config in step with configs/serve.yaml, GPU workers from zero; and
the security of every manifest in deploy/ (`security_findings`): Ray's token auth on, no dashboard open
without it, no token or API key written in a manifest, API keys a file read only where the ingress runs."""
import copy
import shlex
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from croniter import croniter

from jobs import caption, schedule
from pipeline.config import PipelineConfig, ServeSection
from pipeline.ops.schedule import check_prefixes
from pipeline.ops.submit import is_secret_name

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
    # The one difference besides the config's path: the keys file mounted from the Secret (below).
    set_items = app["args"]["set"]
    assert set_items[:-1] == expected["args"]["set"] and set_items[-1] == f"serve.api_keys_file={KEYS_FILE}"
    app, expected = copy.deepcopy(app), copy.deepcopy(expected)
    app["args"]["set"].pop()
    assert local_path(app["args"]["config"]) == ROOT / expected["args"]["config"]
    assert {**app, "args": {**app["args"], "config": None}} == {**expected, "args": {**expected["args"], "config": None}}
    assert served["http_options"] == reference["http_options"]
    check_cluster(service["spec"]["rayClusterConfig"], min_gpu_workers=1)


KEYS_SECRET = "gemma-api-keys"
KEYS_FILE = "/var/run/secrets/gemma/api-keys"


def test_rayservice_api_keys_are_a_file_in_the_ingress_pods_only():
    """The keys reach the ingress replicas as serve.api_keys_file, a read-only mount of the Secret in the
    worker pods (the only ones with CPUs for an ingress replica: the head offers num-cpus 0), and are
    in no pod's environment."""
    spec = load("rayservice.yaml")["spec"]
    config = PipelineConfig.load(local_path(yaml.safe_load(spec["serveConfigV2"])["applications"][0]["args"]["config"]),
                                 [f"serve.api_keys_file={KEYS_FILE}"], environ={})
    assert config.serve.ingress_num_cpus > 0, "an ingress replica without CPUs could land on the head (no keys)"
    cluster = spec["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert not keys_mounts(cluster["headGroupSpec"]["template"]["spec"])
    for group in cluster["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        (mount,) = keys_mounts(pod)
        assert mount["readOnly"] is True and f"{mount['mountPath']}/api-keys" == KEYS_FILE
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["secret"]["defaultMode"] == 0o440 and pod["securityContext"]["fsGroup"] == 100
    assert security_findings("rayservice.yaml", load("rayservice.yaml")) == []


def keys_mounts(pod: dict) -> list[dict]:
    secret_volumes = {v["name"] for v in pod.get("volumes", []) if v.get("secret", {}).get("secretName") == KEYS_SECRET}
    return [m for c in pod["containers"] for m in c.get("volumeMounts", []) if m["name"] in secret_volumes]


def ray_clusters(doc, path=""):
    """(path, RayCluster spec) of every Ray cluster a KubeRay manifest creates, at any depth."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key in ("rayClusterSpec", "rayClusterConfig") or (key == "spec" and doc.get("kind") == "RayCluster"):
                yield f"{path}.{key}", value
            else:
                yield from ray_clusters(value, f"{path}.{key}")
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from ray_clusters(value, f"{path}[{i}]")


def env_entries(doc, path=""):
    """(path, entry) of every container environment entry ({name, value | valueFrom}) in the manifest."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key == "env" and isinstance(value, list):
                yield from ((f"{path}.env", e) for e in value)
            else:
                yield from env_entries(value, f"{path}.{key}")
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from env_entries(value, f"{path}[{i}]")


def pod_specs(cluster: dict):
    yield "head", cluster["headGroupSpec"]["template"]["spec"]
    for group in cluster.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]["spec"]


def security_findings(name: str, doc: dict) -> list[str]:
    """What in one KubeRay manifest lets in someone who does not belong. Empty for a safe manifest."""
    findings = []
    keys_env = ServeSection().api_keys_env
    if doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
        findings.append(f"{name}: a Secret with its values written in the manifest")
    for path, entry in env_entries(doc):
        key_ref = entry.get("valueFrom", {}).get("secretKeyRef", {})
        if "value" in entry and (is_secret_name(entry["name"]) or entry["name"] == keys_env):
            findings.append(f"{name}{path}: {entry['name']} given as a literal value")
        if entry["name"] == keys_env or key_ref.get("name") == KEYS_SECRET:
            findings.append(f"{name}{path}: API keys in a pod's environment (every process inherits them)")
        if entry["name"] == "RAY_AUTH_MODE" and entry.get("value") != "token":
            findings.append(f"{name}{path}: RAY_AUTH_MODE={entry.get('value')!r}, not token")
    for path, cluster in ray_clusters(doc):
        token = (cluster.get("authOptions") or {}).get("mode") == "token"
        if not token:
            findings.append(f"{name}{path}: authOptions.mode is not token (Ray's APIs accept anyone)")
        # KubeRay's default dashboard host is 0.0.0.0 (reachable from every pod of the cluster network).
        host = cluster["headGroupSpec"].get("rayStartParams", {}).get("dashboard-host", "0.0.0.0")
        if host not in ("127.0.0.1", "localhost") and not token:
            findings.append(f"{name}{path}: dashboard / job API on {host} without token auth")
        for group, pod in pod_specs(cluster):
            for container in pod["containers"][:1]:  # the Ray container (KubeRay: the first)
                env = {e["name"]: e.get("value") for e in container.get("env", [])}
                if env.get("RAY_AUTH_MODE") != "token":
                    findings.append(f"{name}{path} {group}: RAY_AUTH_MODE not token on the Ray container "
                                    "(an operator that drops authOptions would start an open cluster)")
        if "serveConfigV2" in doc.get("spec", {}):
            served = yaml.safe_load(doc["spec"]["serveConfigV2"])
            for app in served["applications"]:
                sets = dict(item.split("=", 1) for item in app.get("args", {}).get("set", []))
                keys_file = sets.get("serve.api_keys_file")
                ingress_pods = [pod for group, pod in pod_specs(cluster) if group != "head"]
                if not keys_file:
                    findings.append(f"{name}: serve.api_keys_file not set (the keys must be a mounted file)")
                elif not ingress_pods or not all(
                        any(keys_file.startswith(m["mountPath"].rstrip("/") + "/") for m in keys_mounts(pod))
                        for pod in ingress_pods):
                    findings.append(f"{name}: {keys_file} is not mounted from the {KEYS_SECRET} Secret in every worker pod")
                if keys_mounts(cluster["headGroupSpec"]["template"]["spec"]):
                    findings.append(f"{name}: the API keys are mounted in the head pod, where no ingress runs")
                for var, value in app.get("runtime_env", {}).get("env_vars", {}).items():
                    if is_secret_name(var) or var == keys_env:
                        findings.append(f"{name}: serveConfigV2 runtime_env {var} carries a secret")
    return findings


MANIFESTS = sorted(p.name for p in (ROOT / "deploy").glob("*.yaml"))


@pytest.mark.parametrize("name", MANIFESTS)
def test_every_manifest_is_closed(name):
    docs = list(yaml.safe_load_all((ROOT / "deploy" / name).read_text()))
    assert [f for doc in docs for f in security_findings(name, doc)] == []
    assert any(True for doc in docs for _ in ray_clusters(doc)), "each manifest creates a Ray cluster"


def _head(doc):
    return next(cluster for _, cluster in ray_clusters(doc))["headGroupSpec"]


def _drop_auth(doc):
    for _, cluster in ray_clusters(doc):
        cluster.pop("authOptions")


def _disable_auth(doc):
    for _, cluster in ray_clusters(doc):
        cluster["authOptions"]["mode"] = "disabled"


def _literal_token(doc):
    _head(doc)["template"]["spec"]["containers"][0]["env"].append({"name": "RAY_AUTH_TOKEN", "value": "abc123"})


def _keys_env_in_head(doc):
    _head(doc)["template"]["spec"]["containers"][0]["env"].append(
        {"name": "GEMMA_API_KEYS", "valueFrom": {"secretKeyRef": {"name": KEYS_SECRET, "key": "keys"}}})


def _literal_keys(doc):
    _head(doc)["template"]["spec"]["containers"][0]["env"].append({"name": "GEMMA_API_KEYS", "value": "k1,k2"})


def _no_auth_mode_env(doc):
    _head(doc)["template"]["spec"]["containers"][0]["env"] = []


def _auth_mode_disabled(doc):
    _head(doc)["template"]["spec"]["containers"][0]["env"] = [{"name": "RAY_AUTH_MODE", "value": "disabled"}]


def _keys_in_head_pod(doc):
    pod = _head(doc)["template"]["spec"]
    pod["volumes"] = [{"name": "k", "secret": {"secretName": KEYS_SECRET}}]
    pod["containers"][0]["volumeMounts"] = [{"name": "k", "mountPath": "/var/run/secrets/gemma"}]


def _no_keys_file(doc):
    served = yaml.safe_load(doc["spec"]["serveConfigV2"])
    served["applications"][0]["args"]["set"] = [s for s in served["applications"][0]["args"]["set"]
                                                if not s.startswith("serve.api_keys_file=")]
    doc["spec"]["serveConfigV2"] = yaml.safe_dump(served)


@pytest.mark.parametrize("name, mutate, expected", [
    pytest.param(name, _drop_auth, "authOptions.mode is not token", id=f"{name}-no-authOptions") for name in MANIFESTS
] + [
    pytest.param("rayjob-caption.yaml", _disable_auth, "dashboard / job API on 0.0.0.0 without token auth", id="open-dashboard"),
    pytest.param("raycronjob-schedule.yaml", _literal_token, "RAY_AUTH_TOKEN given as a literal value", id="literal-token"),
    pytest.param("rayservice.yaml", _keys_env_in_head, "API keys in a pod's environment", id="keys-env"),
    pytest.param("rayservice.yaml", _literal_keys, "GEMMA_API_KEYS given as a literal value", id="literal-keys"),
    pytest.param("rayjob-caption.yaml", _no_auth_mode_env, "RAY_AUTH_MODE not token on the Ray container", id="no-mode-env"),
    pytest.param("rayservice.yaml", _auth_mode_disabled, "RAY_AUTH_MODE='disabled', not token", id="mode-disabled"),
    pytest.param("rayservice.yaml", _keys_in_head_pod, "API keys are mounted in the head pod", id="keys-in-head"),
    pytest.param("rayservice.yaml", _no_keys_file, "serve.api_keys_file not set", id="no-keys-file"),
])
def test_the_security_checks_can_fail(name, mutate, expected):
    doc = copy.deepcopy(load(name))
    mutate(doc)
    findings = security_findings(name, doc)
    assert any(expected in f for f in findings), findings


def test_a_secret_with_values_is_refused():
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": KEYS_SECRET}, "stringData": {"api-keys": "k1"}}
    assert security_findings("keys.yaml", secret) == ["keys.yaml: a Secret with its values written in the manifest"]


@pytest.mark.parametrize("name", ["rayjob-caption.yaml", "raycronjob-schedule.yaml", "rayservice.yaml"])
def test_manifests_are_single_documents(name):
    assert len(list(yaml.safe_load_all((ROOT / "deploy" / name).read_text()))) == 1
