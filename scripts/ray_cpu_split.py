"""CPU seconds per served request by Ray process kind, under load (vision, --engine ray)."""
import os, subprocess, sys, time, json
from pathlib import Path
TICK = os.sysconf("SC_CLK_TCK")
def procs():
    out = {}
    for e in Path("/proc").iterdir():
        if not e.name.isdigit(): continue
        try:
            cmd = (e / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (e / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError: continue
        if "roofserve" not in cmd and "ray" not in cmd: continue
        if "bench" in cmd or "raycpu" in cmd: continue
        out[int(e.name)] = (cmd[:80], (int(stat[11]) + int(stat[12])) / TICK)
    return out
def kind(cmd):
    for k in ("ServeReplica", "ProxyActor", "ServeController", "raylet", "gcs_server", "dashboard", "monitor.py", "log_monitor", "runtime_env", "roofserve serve"):
        if k in cmd: return k
    return cmd[:40]
port = int(sys.argv[1]); n = int(sys.argv[2]) if len(sys.argv) > 2 else 400
bench = [sys.executable, "-m", "roofserve", "bench", "vision-api", "--url", f"http://127.0.0.1:{port}/predict", "--concurrency", "32", "--requests", str(n), "--out", "/tmp/ab/raycpu.json"]
before = procs(); t = time.time()
done = subprocess.run(bench, capture_output=True, text=True)
wall = time.time() - t; after = procs()
rows = json.loads(open("/tmp/ab/raycpu.json").read())
print(done.stdout[-600:])
by = {}
for pid, (cmd, cpu) in after.items():
    by[kind(cmd)] = by.get(kind(cmd), 0) + cpu - before.get(pid, (cmd, 0))[1]
served = n
for k, v in sorted(by.items(), key=lambda kv: -kv[1]):
    if v > 0.05: print(f"{k:20s} {v:7.2f} s CPU  {1000 * v / served:6.2f} ms/request")
print("wall", round(wall, 1), "s")
