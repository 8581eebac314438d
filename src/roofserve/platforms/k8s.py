"""Kubernetes manifests rendered from the same config a server runs with, so that the knobs and the
manifests never drift: the container's args are the config's own flags, the probes are the server's
`/health` (503 until warm and while draining), the grace period covers `grace_s`, and the resources
follow the workers and threads.

Deployment (startup, readiness and liveness probes; a preStop pause so that the Service stops sending
before SIGTERM makes the server refuse connections), Service, HorizontalPodAutoscaler (CPU) and
PodDisruptionBudget. With `platform = "ray"`: a KubeRay RayService (Ray cluster + the Serve application).
"""

from __future__ import annotations

import dataclasses
import math

from roofserve.config import K8sConfig, LLMConfig, ServerConfig, changed_fields, config_flags
from roofserve.platforms.ray_proxy import PROXY_CALLBACK, PROXY_CALLBACK_ENV
from roofserve.errors import UserError

PRESTOP_S = 5  # endpoints take a few seconds to drop a terminating pod; keep serving meanwhile
# what the server needs besides its workers: the HTTP process and LitServe's launcher and manager
HTTP_CORES = 1


def render(what: str, server: ServerConfig, k8s: K8sConfig) -> list[dict]:
    """The manifests for `roofserve serve WHAT` with `server`'s knobs, as dicts (one per object): a
    Deployment and its Service, HPA and PDB, or with `platform = "ray"` a KubeRay RayService."""
    if server.device == "cuda":
        raise UserError("deploy k8s renders CPU pods; add the GPU resource (nvidia.com/gpu) to the output by hand")
    if not server.threads_per_worker:
        # inside a pod os.cpu_count() sees the node, not the pod's CPU: threads are set, not derived
        server = dataclasses.replace(server, threads_per_worker=1)
    name = k8s.name or f"roofserve-{what}"
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "roofserve"}
    meta = {"name": name, "labels": labels, **({"namespace": k8s.namespace} if k8s.namespace else {})}
    if server.platform == "ray":
        return [_rayservice(what, server, k8s, meta)]
    return [_deployment(what, server, k8s, meta, labels), _service(server, meta, labels), _hpa(k8s, meta),
            _pdb(meta, labels)]


RAY_VERSION = "2.60.0"  # the ray extra's pin: the image's Ray and the cluster's must match


def _rayservice(what: str, server: ServerConfig, k8s: K8sConfig, meta: dict) -> dict:
    """A KubeRay RayService: a head pod that runs no replicas (Serve's controller and proxy), and one
    worker pod per replica whose Ray CPUs are the replica's threads; the Serve application is our
    builder (platforms.rayserve.build_app) with the config's own fields, so the knobs cannot drift."""
    import yaml

    config = changed_fields(server, skip=("host", "port", "api_key", "api_key_file", "platform", "ray_address"))
    serve_config = {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": server.port},
        "applications": [{"name": "roofserve", "route_prefix": "/", "import_path": "roofserve.platforms.rayserve:build_app",
                          "args": {"server": what, "config": config}}],
    }
    threads = server.threads_per_worker
    memory = f"{k8s.memory_gib or 2:g}Gi"

    def pod(name: str, cpu: int, ports: list[dict]) -> dict:
        container = {"name": name, "image": k8s.image, "ports": ports,
                     "env": [{"name": PROXY_CALLBACK_ENV, "value": PROXY_CALLBACK}],  # a proxy on every node
                     "resources": {"requests": {"cpu": str(cpu), "memory": memory}, "limits": {"memory": memory}},
                     # `ray stop` takes the node out of the cluster before the pod goes (KubeRay samples do the same)
                     "lifecycle": {"preStop": {"exec": {"command": ["/bin/sh", "-c", "ray stop"]}}}}
        return {"spec": {"terminationGracePeriodSeconds": math.ceil(server.grace_s) + 10, "containers": [container]}}

    most = max(server.ray_max_replicas, server.ray_replicas)
    spec = {
        "serveConfigV2": yaml.safe_dump(serve_config, sort_keys=False),
        "rayClusterConfig": {
            "rayVersion": RAY_VERSION,
            "enableInTreeAutoscaling": most > server.ray_replicas,
            "headGroupSpec": {"rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                              "template": pod("ray-head", HTTP_CORES, [
                                  {"name": "gcs", "containerPort": 6379}, {"name": "dashboard", "containerPort": 8265},
                                  {"name": "serve", "containerPort": server.port}])},
            "workerGroupSpecs": [{"groupName": "replicas", "replicas": server.ray_replicas,
                                  "minReplicas": server.ray_replicas, "maxReplicas": most,
                                  "rayStartParams": {"num-cpus": str(threads)},
                                  "template": pod("ray-worker", threads, [])}],
        },
    }
    return {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": meta, "spec": spec}


def cores(server: ServerConfig) -> int:
    """CPU the pod requests: every worker's threads, and one core for the HTTP process."""
    return server.workers_per_device * server.threads_per_worker + HTTP_CORES


def _deployment(what: str, server: ServerConfig, k8s: K8sConfig, meta: dict, labels: dict) -> dict:
    args = ["serve", what, "--host", "0.0.0.0", "--port", str(server.port),
            *config_flags(server, skip=("host", "port", "api_key", "api_key_file"), changed_only=True)]
    memory = k8s.memory_gib or (4 if isinstance(server, LLMConfig) else 2)
    probe = {"httpGet": {"path": "/health", "port": "http"}}
    container = {
        "name": what,
        "image": k8s.image,
        "command": ["roofserve"],
        "args": args,
        "ports": [{"name": "http", "containerPort": server.port}],
        # no CPU limit: CFS throttling turns into tail latency; the request sizes the node and the autoscaler
        "resources": {"requests": {"cpu": str(cores(server)), "memory": f"{memory:g}Gi"},
                      "limits": {"memory": f"{memory:g}Gi"}},
        "startupProbe": {**probe, "periodSeconds": 5, "failureThreshold": math.ceil(k8s.startup_timeout_s / 5)},
        "readinessProbe": {**probe, "periodSeconds": 5, "failureThreshold": 1},
        "livenessProbe": {**probe, "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 6},
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_S)]}}},
    }
    if k8s.api_key_secret:
        container["env"] = [{"name": "ROOFSERVE_API_KEY",
                             "valueFrom": {"secretKeyRef": {"name": k8s.api_key_secret, "key": "api-key"}}}]
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
        "spec": {
            "replicas": k8s.replicas,
            "selector": {"matchLabels": {"app.kubernetes.io/name": meta["name"]}},
            # one new pod at a time, none taken away before its replacement is ready
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": dict(labels)},
                "spec": {
                    # the preStop pause, then SIGTERM: grace_s for the admitted requests, and room to stop
                    "terminationGracePeriodSeconds": PRESTOP_S + math.ceil(server.drain_s + server.grace_s) + 10,
                    "containers": [container],
                },
            },
        },
    }


def _service(server: ServerConfig, meta: dict, labels: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta,
            "spec": {"selector": {"app.kubernetes.io/name": meta["name"]},
                     "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}


def _hpa(k8s: K8sConfig, meta: dict) -> dict:
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": meta,
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": meta["name"]},
                     "minReplicas": k8s.min_replicas, "maxReplicas": k8s.max_replicas,
                     "metrics": [{"type": "Resource", "resource": {
                         "name": "cpu", "target": {"type": "Utilization",
                                                   "averageUtilization": k8s.target_cpu_percent}}}]}}


def _pdb(meta: dict, labels: dict) -> dict:
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": meta,
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app.kubernetes.io/name": meta["name"]}}}}


def to_yaml(objects: list[dict]) -> str:
    import yaml

    class Plain(yaml.SafeDumper):
        def ignore_aliases(self, data) -> bool:  # no &id001 anchors: each object reads on its own
            return True

    def text(dumper, data: str):  # multi-line strings (a RayService's serveConfigV2) as literal blocks
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|" if "\n" in data else None)

    Plain.add_representer(str, text)

    return "---\n".join(yaml.dump(o, Dumper=Plain, sort_keys=False) for o in objects)

