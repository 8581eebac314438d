"""Capacity on paper: cores for a load from measured req/s per busy core, and the model's own check."""

from roofserve.report.capacity import at_target, chat_section, plan, section, users_at_target


def row(step, rps, p99, cpu, replicas, level=8):
    return {"step": step, "req_per_s": rps, "latency_p99_ms": p99, "errors": 0, "cpu_percent": cpu, "concurrency": level,
            "config": {"platform": "ray", "ray_replicas": replicas, "threads_per_worker": 2 // replicas, "port": replicas}}


def test_the_best_level_within_the_latency_target_sets_the_cores():
    rows = [row("a", 40, 300, 50, 1, 8), row("a", 60, 900, 100, 1, 32)]
    assert at_target(rows)["req_per_s"] == 40  # 60 req/s broke the 500 ms p99 target
    p = plan(at_target(rows), machine_cores=2, load=1000, price=0.1)
    assert p["per_core"] == 40 and p["cores"] == 25 and p["machines"] == 13 and abs(p["usd_per_hour"] - 2.5) < 1e-9


def test_the_servers_own_cpu_sets_the_cores_not_the_load_generators():
    measured = {**row("a", 40, 300, 100, 1), "cpu_ms_per_request": {"inference workers": 20.0, "server processes": 5.0}}
    # 25 ms of server CPU per request x 40 req/s = 1 core, though the machine (load generator too) was 100% busy
    assert plan(measured, machine_cores=2, load=1000)["per_core"] == 40
    assert plan(row("a", 40, 300, 100, 1), machine_cores=2, load=1000)["per_core"] == 20  # only the machine's %


def test_the_check_predicts_more_replicas_from_fewer_and_a_step_without_a_level_in_target_says_so():
    steps = {"one": [row("one", 40, 300, 50, 1)], "two": [row("two", 90, 300, 100, 2)], "slow": [row("slow", 9, 2000, 50, 1)]}
    intro, body, checks = section(steps, machine_cores=2)
    assert "10,000 req/s" in intro and body[2][-1].startswith("no level")
    assert checks == ["two: predicted from one 80.0 req/s, measured 90.0 (+12%)"]


def level(users, tpot, ttft_p99, ok=None, tok_s=50.0):
    return {"concurrency": users, "tpot_p50_ms": tpot, "ttft_p99_ms": ttft_p99, "errors": 0,
            "ok": users * 2 if ok is None else ok, "requests": users * 2, "output_tokens_per_s": tok_s}


def test_chat_users_per_server_are_the_most_users_within_both_latency_targets():
    rows = [level(1, 25, 150), level(4, 40, 400), level(8, 60, 2500), level(16, 140, 900)]
    assert users_at_target(rows)["concurrency"] == 4  # 8 broke the TTFT target, 16 the TPOT target
    assert users_at_target([level(4, 40, 400, ok=7)]) is None, "a level with failed requests does not count"
    intro, body = chat_section({"batch": rows, "slow": [level(1, 150, 100)]}, machine_cores=2, users=1000, price=0.1)
    assert "1,000 concurrent chat users" in intro
    assert body[0] == ["batch", 4, 50.0, 250, 500, "$50"]
    assert body[1][-1].startswith("no level")
