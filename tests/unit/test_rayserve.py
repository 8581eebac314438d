"""The Ray Serve platform's deployment options come from the server's own config (no Ray started here)."""

from roofserve.config import VisionConfig, make_config
from roofserve.platforms.rayserve import deployment_options, replica_threads


def test_fixed_replicas_reserve_their_threads_and_hold_two_batches():
    cfg = make_config(VisionConfig, {"platform": "ray", "ray_replicas": 2, "threads_per_worker": 1, "max_batch_size": 16,
                                     "max_queued_requests": 99, "grace_s": 7})
    options = deployment_options(cfg)
    assert options["num_replicas"] == 2 and "autoscaling_config" not in options
    assert options["ray_actor_options"] == {"num_cpus": 1}
    assert options["max_ongoing_requests"] == 32  # @serve.batch fills batches only up to what a replica holds
    assert options["max_queued_requests"] == 99 and options["graceful_shutdown_timeout_s"] == 7


def test_max_replicas_turns_on_the_autoscaler_and_threads_default_to_cores_over_replicas():
    import os

    cfg = make_config(VisionConfig, {"platform": "ray", "ray_replicas": 1, "ray_max_replicas": 4,
                                     "ray_target_ongoing_requests": 3.0})
    options = deployment_options(cfg)
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 3.0}
    assert replica_threads(cfg) == max(1, os.cpu_count() or 1)
