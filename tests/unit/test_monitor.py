"""The CPU a server's process tree spends, by role: what the vision ladder divides by requests."""

import os
import subprocess
import sys
import time

from roofserve.load.monitor import Monitor, process_role


def test_roles_come_from_the_command_lines_ray_and_litserve_give_their_processes():
    assert process_role("ray::ServeReplica:roofserve:vision") == "Ray replicas"
    assert process_role("ray::ProxyActor") == "Ray proxy"
    assert process_role("ray::ServeController").startswith("Ray system")
    assert process_role("/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --x").startswith("Ray system")
    assert process_role("python -B -c from multiprocessing.spawn import spawn_main; spawn_main()") == "inference workers"
    assert process_role("python -m roofserve serve vision --port 8000").startswith("server processes")


def test_a_child_that_burns_cpu_inside_the_window_is_counted_and_one_outside_is_not():
    # The child burns 0.5 s of CPU by its own clock; the kernel's per-process counters (what psutil and the
    # Monitor read) can lag that clock by a tick or more, so the wait is for 0.4 s of it, with a deadline.
    burn = [sys.executable, "-c", "import time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass"]
    subprocess.run(burn, check=True)  # before the window: not counted
    started = time.monotonic()
    with Monitor(interval_s=0.05, server_pid=os.getpid()) as mon:
        child = subprocess.Popen([*burn[:2], burn[2] + "\nimport sys; sys.stdin.read()"], stdin=subprocess.PIPE)
        while child.poll() is None and _cpu_s(child.pid) < 0.4:
            assert time.monotonic() - started < 60, f"the child's CPU time stopped at {_cpu_s(child.pid)} s"
            time.sleep(0.01)
        counted = _cpu_s(child.pid)
    wall = time.monotonic() - started
    child.communicate(b"")
    spent = mon.cpu_s_by_role["server processes (main, HTTP, queues)"]
    assert counted >= 0.4 and spent >= counted, (counted, spent)  # the child, and this process's own polling
    assert spent <= counted + wall + 0.2, "nothing from before the window (this process's imports, the first child)"


def _cpu_s(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system
