"""Kubernetes manifests from a server config: valid against the Kubernetes schemas, and the container's
args rebuild the very config they were rendered from."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from roofserve.cli import build_parser
from roofserve.config import K8sConfig, LLMConfig, VisionConfig, config_from_args, load_toml, make_config
from roofserve.platforms.k8s import render, to_yaml
from roofserve.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def _validate(objects: list[dict]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for obj in objects:
        kubernetes_validate.validate(obj, "1.37.0", strict=True)  # raises on any unknown or wrong field


@pytest.mark.parametrize("what, cls", [("vision", VisionConfig), ("llm", LLMConfig)])
def test_manifests_are_valid_and_their_args_rebuild_the_config(what, cls):
    server = make_config(cls, {"workers_per_device": 1, "threads_per_worker": 2, "grace_s": 45, "api_key": "s3cret",
                               "max_queued_requests": 64})
    objects = render(what, server, make_config(K8sConfig, {"api_key_secret": "key", "namespace": "ml"}))
    _validate(objects)
    deployment, service, hpa, pdb = objects
    assert [o["kind"] for o in objects] == ["Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"]
    assert all(o["metadata"]["namespace"] == "ml" for o in objects)
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    # the args are `roofserve serve WHAT ...`: parsed by our own CLI they give back the same knobs
    args = build_parser().parse_args(container["args"])
    rebuilt = make_config(cls, config_from_args(args, cls))
    assert rebuilt.max_queued_requests == 64 and rebuilt.grace_s == 45 and rebuilt.host == "0.0.0.0"
    assert {**vars(rebuilt), "host": server.host, "api_key": "s3cret"} == vars(server)
    # the secret travels as a Secret reference, never in the args
    assert "s3cret" not in to_yaml(objects) and "--api-key" not in container["args"]
    assert container["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "key", "key": "api-key"}
    assert pod["terminationGracePeriodSeconds"] > 45 + 5, "the preStop pause and grace_s fit in the grace period"
    assert container["resources"]["requests"]["cpu"] == "3"  # 1 worker x 2 threads + the HTTP process
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"] == pdb["spec"]["selector"]["matchLabels"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]


def test_threads_are_pinned_in_a_pod():
    """os.cpu_count() in a pod sees the node: the manifest sets threads per worker, never 0."""
    [deployment, *_] = render("vision", make_config(VisionConfig, {"workers_per_device": 2}), K8sConfig())
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--threads-per-worker") + 1] == "1"
    assert deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "3"


def test_the_committed_example_is_what_its_config_renders():
    doc = load_toml(str(ROOT / "deploy" / "vision.toml"))
    objects = render("vision", make_config(VisionConfig, doc["server"]), make_config(K8sConfig, doc["k8s"]))
    _validate(objects)
    assert list(yaml.safe_load_all((ROOT / "deploy" / "k8s-vision.yaml").read_text())) == objects


def test_cli_writes_manifests_and_refuses_bad_knobs_in_one_line(tmp_path):
    out = tmp_path / "llm.yaml"
    done = subprocess.run([sys.executable, "-m", "roofserve", "deploy", "k8s", "llm", "--precision", "fp32",
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [o["kind"] for o in yaml.safe_load_all(out.read_text())][0] == "Deployment"
    done = subprocess.run([sys.executable, "-m", "roofserve", "deploy", "k8s", "vision", "--min-replicas", "5",
                           "--max-replicas", "2"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "min_replicas <= max_replicas" in done.stderr.strip().splitlines()[-1]
    with pytest.raises(UserError, match="GPU"):
        render("vision", make_config(VisionConfig, {"device": "cuda"}), K8sConfig())


@pytest.mark.parametrize("what,cls", [("vision", VisionConfig), ("llm", LLMConfig)])
def test_the_ray_platform_renders_a_rayservice_whose_application_is_our_builder_with_the_same_config(what, cls):
    """KubeRay's CRD schema is not in kubernetes-validate: the pod templates inside are validated as core
    PodTemplates, and the Serve application's builder is built (not run) from the embedded config."""
    pytest.importorskip("ray.serve")
    import importlib

    server = make_config(cls, {"platform": "ray", "ray_replicas": 2, "ray_max_replicas": 6,
                               "threads_per_worker": 2, "max_batch_size": 8, "grace_s": 30})
    [service] = render(what, server, make_config(K8sConfig, {"image": "me/roofserve:1"}))
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    cluster = service["spec"]["rayClusterConfig"]
    [workers] = cluster["workerGroupSpecs"]
    assert (workers["replicas"], workers["minReplicas"], workers["maxReplicas"]) == (2, 2, 6)
    assert workers["rayStartParams"]["num-cpus"] == "2" and cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the head runs no replica
    for name, group in (("head", cluster["headGroupSpec"]), ("worker", workers)):
        _validate([{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": group["template"]}])
        [env] = group["template"]["spec"]["containers"][0]["env"]  # every node's proxy answers a dead replica 503
        assert env == {"name": "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "value": "roofserve.platforms.ray_proxy.middlewares"}
    app = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    module, attr = app["import_path"].split(":")
    built = getattr(importlib.import_module(module), attr)(app["args"])
    from ray.serve import Application

    assert isinstance(built, Application) and app["args"]["server"] == what
    config = app["args"]["config"]
    assert config["max_batch_size"] == 8 and config["ray_replicas"] == 2 and "platform" not in config
    assert {**vars(make_config(cls, config)), "platform": "ray"} == vars(server)  # the same knobs
