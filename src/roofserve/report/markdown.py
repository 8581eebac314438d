"""The Markdown report: ceilings, the ladder of steps, their plots and a verdict per step."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from roofserve.results import read_results
from roofserve.report import capacity, plots

PIPELINE_SHARE_TARGET = 0.85


def _best(rows: list[dict], key: str) -> dict | None:
    return max(rows, key=lambda r: r.get(key) or 0.0) if rows else None


def verdict(row: dict, pipeline: float | None, model_only: float | None) -> str:
    """Which resource limits a step, read from its own measurements."""
    if row["errors"]:
        return f"failing: {row['errors']} errors ({', '.join(row['error_kinds'])})"
    cpu, gpu, rate = row.get("cpu_percent") or 0.0, row.get("gpu_percent"), row["req_per_s"]
    if gpu is not None and gpu >= 85:
        return "GPU-bound: the model keeps the GPU busy"
    if cpu < 75:
        starved = "GPU waiting; " if gpu is not None else ""
        return f"{starved}cores idle ({cpu:.0f}% CPU): serialized work, batching starved or too few workers"
    if pipeline and rate >= PIPELINE_SHARE_TARGET * pipeline:
        return f"CPU-bound at the pipeline ceiling ({rate / pipeline:.0%} of decode+model in-process)"
    if model_only and rate >= 0.9 * model_only:
        return "CPU-bound on the model itself"
    where = " (GPU waiting)" if gpu is not None else ""
    return f"CPU-bound below the pipeline{where}: decode, payload parsing and HTTP overhead"


def format_value(v) -> str:
    """How a table cell shows a value: one decimal from 10 up, three significant digits below."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"
    return str(v)


def _table(header: list[str], body: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(format_value(v) for v in row) + " |" for row in body]
    return lines


def _pct(a: float | None, b: float | None) -> str:
    return f"{a / b:.0%}" if a and b else "-"


def model_key(row: dict) -> str:
    """'openvino bf16': a vision row's runtime (torch before there were others) and precision."""
    return f"{row.get('runtime', 'torch')} {row['precision']}"


def guard_cell(row: dict | None) -> str:
    if row is None:
        return "-"
    verdict = "pass" if row["passed"] else "**FAIL**"
    return (f"{verdict}: top-1 {row['top1_agree']}/{row['labelled_photos']}, animal {row['animal_agree']}/"
            f"{row['photos']}, mean abs dp {row['mean_abs_prob_diff']:.1e}")


def vision_section(rows: list[dict], out: Path, cores: int | None = None) -> list[str]:
    """Peaks, ceilings, the ladder and, given the machine's cores, the capacity plan."""
    peaks = [r for r in rows if r["kind"] == "peak" and r["suite"] in ("vision", "machine")]
    model = [r for r in rows if r["kind"] == "vision-model"]
    pipe = [r for r in rows if r["kind"] == "vision-pipeline"]
    api = [r for r in rows if r["kind"] == "vision-api"]
    lines = ["## Vision", ""]

    if peaks:
        lines += ["### Measured peaks", ""]
        lines += _table(["resource", "name", "device", "value", "unit", "datasheet"],
                        [[p["resource"], p["name"], p["device"], p["value"], p["unit"], p.get("datasheet")] for p in peaks])
        lines.append("")

    best_model: dict[str, dict] = {}
    for r in model:
        key = model_key(r)
        if key not in best_model or r["img_per_s"] > best_model[key]["img_per_s"]:
            best_model[key] = r
    guard = {model_key(r): r for r in rows if r["kind"] == "vision-accuracy"}
    best_pipe = _best(pipe, "img_per_s")
    if model:
        flops = model[0]["flops_per_image"]
        lines += ["### Ceilings", "",
                  f"FLOPs per image: {flops / 1e9:.3f} GFLOP (counted by torch.utils.flop_counter; FLOPs = 2 x MACs, "
                  "convolutions and matmuls only). Compute roof = measured matmul peak / FLOPs per image (int8 "
                  "against the bf16 peak: its own is not measured).", ""]
        eager = best_model.get("torch bf16")
        body = [[key, r["img_per_s"], r["batch_size"], r.get("compute_roof_img_per_s"), r.get("mfu"),
                 f"{r['img_per_s'] / eager['img_per_s']:.2f}x" if eager else "-", guard_cell(guard.get(key))]
                for key, r in best_model.items()]
        lines += _table(["runtime precision", "model-only img/s (best)", "at batch", "compute roof img/s", "MFU",
                         "x torch bf16", "accuracy guard"], body)
        if guard:
            lines += ["", "Accuracy guard: against fp32 PyTorch on foolbox's 20 labelled ImageNet photos and the "
                      "scikit-image photos: the same top-1 on at least 19 of 20 and the same cat / dog / other on "
                      "every photo. A config that fails is flagged FAIL and is never a default."]
        if best_pipe:
            lines += ["", f"In-process pipeline (decode + preprocess + model, {model_key(best_pipe)}, "
                      f"batch {best_pipe['batch_size']}, {best_pipe.get('lanes', 1)} lane(s) x {best_pipe['threads']} thread(s), no HTTP): "
                      f"**{best_pipe['img_per_s']:.1f} img/s**; decode {best_pipe['decode_ms_per_image']:.2f} ms per image."]
        lines += ["", f"![model-only throughput]({plots.model_throughput(model, out / 'vision_model.png').name})", ""]

    if api:
        steps: dict[str, list[dict]] = OrderedDict()
        for r in sorted(api, key=lambda r: r.get("step_index", 0)):
            steps.setdefault(str(r.get("step", "run")), []).append(r)
        pipeline = best_pipe["img_per_s"] if best_pipe else None
        body, bests = [], {}
        for name, srows in steps.items():
            b = _best(srows, "req_per_s")
            bests[name] = b
            config = b.get("config") or {}
            m = best_model.get(f"{config.get('runtime', 'torch')} {config.get('precision', 'fp32')}", {})
            level = b.get("concurrency") or b.get("rate_per_s")
            body.append([name, b["req_per_s"], level, b["latency_p50_ms"], b["latency_p99_ms"], b.get("cpu_percent"),
                         b.get("gpu_percent"), _pct(b["req_per_s"], m.get("img_per_s")), _pct(b["req_per_s"], pipeline),
                         _pct(b["req_per_s"], m.get("compute_roof_img_per_s")), verdict(b, pipeline, m.get("img_per_s"))])
        lines += ["### The ladder", "",
                  "Best level of each step. % of model-only uses the model-only best of the step's precision; "
                  "% of theoretical uses its compute roof.", ""]
        lines += _table(["step", "req/s", "at level", "p50 ms", "p99 ms", "CPU %", "GPU %", "% of model-only",
                         "% of pipeline", "% of theoretical", "verdict"], body)
        first, top = next(iter(bests.values())), max(bests.values(), key=lambda r: r["req_per_s"])
        lines += ["", f"Best step **{top.get('step')}**: {top['req_per_s']:.1f} req/s = "
                  f"{top['req_per_s'] / first['req_per_s']:.2f}x the first step"
                  + (f", {top['req_per_s'] / pipeline:.0%} of the in-process pipeline." if pipeline else ".")]
        ceilings = {}
        if best_model:
            top_model = max(best_model.values(), key=lambda r: r["img_per_s"])
            ceilings[f"model-only {model_key(top_model)}"] = top_model["img_per_s"]
            if top_model.get("compute_roof_img_per_s"):
                ceilings[f"compute roof {top_model['precision']}"] = top_model["compute_roof_img_per_s"]
        if pipeline:
            ceilings["pipeline"] = pipeline
        lines += ["", f"![throughput]({plots.throughput_vs_concurrency(steps, ceilings, out / 'vision_throughput.png').name})",
                  "", f"![latency]({plots.latency_vs_throughput(steps, out / 'vision_latency.png').name})", ""]
        if cores:
            intro, body, checks = capacity.section(steps, cores)
            lines += ["### Capacity on paper", "", intro, ""]
            lines += _table(["step", "req/s", "at level", "req/s per core", "cores", "machines", "per hour"], body)
            if checks:
                lines += ["", "Model check (same config, more replicas, same machine): " + "; ".join(checks) + "."]
            lines.append("")
        lines += cpu_split_section(bests)
        why = [[name, srows[0].get("why", "")] for name, srows in steps.items() if srows[0].get("why")]
        if why:
            lines += ["### What each step changes", ""] + _table(["step", "change"], why) + [""]
    return lines


def cpu_split_section(bests: dict[str, dict]) -> list[str]:
    """Where each step's CPU goes, per request, at its best level: the server's processes by role (from
    their CPU times over the level), so that an engine's cost shows where it is paid."""
    measured = {name: b["cpu_ms_per_request"] for name, b in bests.items() if b.get("cpu_ms_per_request")}
    if not measured:
        return []
    roles = sorted({role for split in measured.values() for role in split},
                   key=lambda r: -max(split.get(r, 0.0) for split in measured.values()))
    body = [[name, bests[name]["req_per_s"], *(split.get(role, "-") for role in roles),
             round(sum(split.values()), 2)] for name, split in measured.items()]
    intro = ("CPU milliseconds per request at each step's best level, by the kind of server process that spent "
             "them (CPU times of the server's process tree over the level, warm-up included, divided by the "
             "requests answered; the load client is not in it). A step that serves fewer req/s on the same cores "
             "pays the difference here.")
    return ["### Where the CPU goes", "", intro, "", *_table(["step", "req/s", *roles, "total ms"], body), ""]


MBU_BANDWIDTH_BOUND = 0.6
KERNEL_BOUND = (0.8, 1.25)  # a bf16 decode step reading at about the rate of its one-token matmul kernel alone
TORCH_GEMV = "torch's bf16 one-token matmuls"
OUR_GEMV = "roofserve's GEMV kernel"


def llm_verdict(mbu: float | None, kernel_share: float | None = None, kernel: str = TORCH_GEMV) -> str:
    """kernel_share: decode bytes/s over what the step's one-token matmul kernel (`kernel`) reads alone
    (bf16 steps only)."""
    if mbu is None:
        return "-"
    if mbu >= MBU_BANDWIDTH_BOUND:
        return f"bandwidth-bound ({mbu:.0%} of the roof)"
    if kernel_share is not None and KERNEL_BOUND[0] <= kernel_share <= KERNEL_BOUND[1]:
        return f"matmul-kernel-bound: {mbu:.0%} of the roof, but {kernel_share:.0%} of the rate of {kernel} alone"
    if kernel_share is not None and kernel_share > KERNEL_BOUND[1]:
        return f"past the rate of {kernel} alone ({kernel_share:.1f}x), {mbu:.0%} of the roof"
    return f"overhead-bound: {mbu:.0%} of the roof; per-token compute, dispatch and Python dominate"


TTFT_TARGET = (2.0, 10.0)  # the target: TTFT <= 2 x the prefill roof + 10 ms


def ttft_section(api: list[dict], engine: list[dict]) -> list[str]:
    """Time to first token per step and prompt, against the prefill roof: the prompt's matmul FLOPs at the
    measured peak, or reading the weights once, whichever is longer."""
    body = []
    for r in api:
        roof = r.get("prefill_roof_ms")
        if roof is None:
            continue
        mine = [e for e in engine if e.get("step") == r.get("step") and e.get("prefill_roof_ms") is not None]
        chat = next((e for e in mine if e.get("prompt") == "chat"), None)
        ttft = r.get("ttft_p50_ms")
        body.append([r.get("step"), "served chat", r.get("prompt_tokens"), ttft, r.get("prefill_compute_roof_ms"),
                     r.get("prefill_weight_read_ms"), roof, f"{ttft / roof:.1f}x" if ttft else "-",
                     _ttft_target(ttft, roof)])
        for e in sorted(mine, key=lambda e: e is chat):
            body.append([r.get("step"), f"in-process {e['prompt']}", e["prompt_tokens"], e["ttft_ms"],
                         e.get("prefill_compute_roof_ms"), e.get("prefill_weight_read_ms"), e["prefill_roof_ms"],
                         f"{e['ttft_ms'] / e['prefill_roof_ms']:.1f}x", _ttft_target(e["ttft_ms"], e["prefill_roof_ms"])])
    if not body:
        return []
    factor, extra = TTFT_TARGET
    return ["### Time to first token against the prefill roof", "",
            "Prefill roof = the longer of the prompt's matmul FLOPs (2 x the layers' linear parameters x prompt tokens, plus the LM head once, for the last position) at the "
            "measured matmul peak of the step's precision, and reading the weights once at the measured bandwidth. "
            f"Target: TTFT <= {factor:g} x roof + {extra:g} ms. Served TTFT also pays HTTP, the queue hop and the "
            "first SSE event.", ""] + _table(
        ["step", "prompt", "prompt tokens", "TTFT ms", "compute roof ms", "weight read ms", "prefill roof ms",
         "TTFT / roof", f"<= {factor:g}x roof + {extra:g} ms"], body) + [""]


def _ttft_target(ttft: float | None, roof: float | None) -> str:
    if not ttft or not roof:
        return "-"
    factor, extra = TTFT_TARGET
    return "yes" if ttft <= factor * roof + extra else "no"


def concurrency_section(levels: dict[str, list[dict]], out: Path, cores: int | None = None) -> list[str]:
    """Steps measured at several concurrency levels: aggregate tok/s per level against the roof of the
    batch size the level runs at (min(users, max_batch_size) sequences per step)."""
    lines = ["### Many users at once", "",
             "Each level runs its users' requests at once (a different prompt each). Aggregate = all output "
             "tokens / wall time; x 1 user compares it with the step's own 1-user level. The roof of a level: "
             "B = min(users, max batch size) sequences per step read the weights once and their KV caches "
             "(bandwidth roof) and do 2 x parameters x B FLOPs (compute roof, at the measured matmul peak); "
             "% of roof = aggregate / the lower of the two.", ""]
    body = []
    for name, rows in levels.items():
        rows = sorted(rows, key=lambda r: r["concurrency"])
        one = next((r["output_tokens_per_s"] for r in rows if r["concurrency"] == 1), None)
        for r in rows:
            agg, roof = r.get("output_tokens_per_s"), r.get("aggregate_roof_tokens_per_s")
            body.append([name, r["concurrency"], r.get("sequences_per_step"), agg,
                         f"{agg / one:.2f}x" if agg and one else "-", r.get("tpot_p50_ms"), r.get("tpot_p99_ms"),
                         r.get("ttft_p50_ms"), r.get("ttft_p99_ms"), f"{r['ok']}/{r['requests']}",
                         r.get("aggregate_bandwidth_roof_tokens_per_s"), r.get("aggregate_compute_roof_tokens_per_s"),
                         _pct(agg, roof)])
    lines += _table(["step", "users", "sequences / step", "aggregate tok/s", "x 1 user", "TPOT p50 ms", "TPOT p99 ms",
                     "TTFT p50 ms", "TTFT p99 ms", "served", "bandwidth roof tok/s", "compute roof tok/s",
                     "% of roof"], body)
    crossovers = {r.get("crossover_batch_size") for rows in levels.values() for r in rows} - {None}
    if crossovers:
        lines += ["", "Crossover: the compute roof binds from a batch of " + ", ".join(map(str, sorted(crossovers)))
                  + " sequences per step on (below it a step is bound by reading the weights)."]
    lines += ["", f"![llm concurrency]({plots.llm_concurrency(levels, out / 'llm_concurrency.png').name})", ""]
    if cores:
        intro, body = capacity.chat_section(levels, cores)
        lines += ["### Capacity on paper: chat users", "", intro, ""]
        lines += _table(["step", "users per server", "aggregate tok/s there", "servers", "cores", "per hour"], body)
        lines.append("")
    return lines


def llm_section(rows: list[dict], out: Path, cores: int | None = None) -> list[str]:
    all_levels = sorted([r for r in rows if r["kind"] == "llm-api"], key=lambda r: r.get("step_index", 0))
    levels: dict[str, list[dict]] = OrderedDict()
    for r in all_levels:
        levels.setdefault(str(r.get("step")), []).append(r)
    # the ladder table: each step at its lowest level (1 user where measured)
    api = [min(group, key=lambda r: r.get("concurrency") or 1) for group in levels.values()]
    multi = OrderedDict((name, group) for name, group in levels.items() if len(group) > 1)
    engine = [r for r in rows if r["kind"] == "llm-engine"]
    peaks = [r for r in rows if r["kind"] == "peak" and r["resource"] == "bandwidth" and r["suite"] == "llm"]
    lines = ["## LLM", ""]
    if peaks:
        lines += ["Bandwidth measured in the LLM run: " + ", ".join(f"{p['name']} {p['value']:.1f} GB/s" for p in peaks)
                  + ". Roofs use the read bandwidth of a buffer several times the CPU's last-level cache (DRAM), "
                  "or, where reading a buffer of the step's own bytes per token, timed in the same rounds, was more "
                  "than 20% faster (memory: cache; the caches hold the model, at least in part), that rate: a DRAM "
                  "roof would flatter a model the caches hold; gemv-bf16 is the weight bytes per second that torch's one-token "
                  "bf16 linear layers read (SmolLM2's MLP shape), i.e. what the matmul library reaches under the roof; "
                  "steps with `--gemv roofserve` are compared with our kernel's own rate, measured the same way on "
                  "weights of the same shape and size (\"our GEMV GB/s\", in each round).", ""]
    lines += ["Bytes per token = weights at their storage size (every linear layer, the LM head included: with tied "
              "embeddings it reads the embedding table; one embedding row; norms) + the KV cache at the mean context. "
              "MBU = decode tokens/s x bytes per token / bandwidth. In-process numbers are the same engine on the "
              "same prompt, without HTTP.", ""]
    if any(r.get("rounds_bandwidth_gb_s") for r in rows if r["kind"] == "llm-api"):
        lines += ["Each step alternates served requests, in-process runs and a read-bandwidth measurement in rounds, "
                  "so that both sides and the roof see the same machine (a shared VM drifts by tens of percent within "
                  "minutes); the table gives medians, and each step's roof and MBU use the bandwidth measured "
                  "during that step (read GB/s).", ""]
    body, bars = [], []
    for r in api:
        eng = [e for e in engine if e.get("step") == r.get("step")]
        chat = next((e for e in eng if e.get("prompt") == "chat"), None)
        # compare like with like: the engine on the very prompt the server was sent, where measured
        eng_decode = chat["decode_tokens_per_s"] if chat else max((e["decode_tokens_per_s"] or 0 for e in eng), default=None)
        prefill = max((e["prefill_tokens_per_s"] for e in eng), default=None)
        ttft_added = round(r["ttft_p50_ms"] - chat["ttft_ms"], 1) if chat and r.get("ttft_p50_ms") else None
        bpt, bw, tps = r.get("bytes_per_token"), r.get("bandwidth_gb_s"), r.get("decode_tokens_per_s")
        mbu = tps * bpt / (bw * 1e9) if tps and bpt and bw else None
        gemv, ours = r.get("gemv_gb_s"), r.get("kernel_gemv_gb_s")
        kernel, rate = (OUR_GEMV, ours) if ours else (TORCH_GEMV, gemv)
        kernel_share = tps * bpt / (rate * 1e9) if tps and bpt and rate and r.get("weight_format") == "bf16" else None
        body.append([r.get("step"), r.get("weight_format"), tps, eng_decode, _pct(tps, eng_decode),
                     r.get("ttft_p50_ms"), chat["ttft_ms"] if chat else None, ttft_added, r.get("ttft_p99_ms"),
                     r.get("tpot_p50_ms"), r.get("tpot_p99_ms"), prefill,
                     round(bpt / 1e6, 1) if bpt else None, r.get("memory_level", "DRAM"), round(bw, 1) if bw else None,
                     gemv, ours,
                     round(tps * bpt / 1e9, 1) if tps and bpt else None, r.get("roof_tokens_per_s"),
                     f"{mbu:.0%}" if mbu else "-", llm_verdict(mbu, kernel_share, kernel)])
        bars.append((str(r.get("step")), tps, eng_decode, r.get("roof_tokens_per_s")))
    if body:
        lines += _table(["step", "weights", "served decode tok/s", "in-process tok/s", "served / in-process",
                         "TTFT p50 ms", "in-process TTFT ms", "TTFT added ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms", "prefill tok/s", "MB / token",
                         "memory", "read GB/s", "torch GEMV GB/s", "our GEMV GB/s", "decode GB/s", "roof tok/s", "MBU", "verdict"], body)
        unverified = [r.get("step") for r in api if not r.get("fixed_length_verified", True)]
        if unverified:
            lines += ["", f"Output length not confirmed by usage for: {', '.join(map(str, unverified))}."]
        lines += ["", f"![llm decode]({plots.llm_decode_bars(bars, out / 'llm_decode.png').name})", ""]
        lines += ttft_section(api, engine)
        if multi:
            lines += concurrency_section(multi, out, cores)
        why = [[r.get("step"), r.get("why", "")] for r in api if r.get("why")]
        if why:
            lines += ["### What each step changes", ""] + _table(["step", "change"], why) + [""]
    return lines


def build_report(paths: list[str], out_dir: str) -> Path:
    metas, rows = read_results(paths)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    machine, versions = metas[0]["machine"], metas[0]["versions"]
    lines = ["# roofserve report", "",
             f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']} GB"
             + (f", GPU {machine['gpu']}" if machine.get("gpu") else ", no GPU") + ".  ",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".  ",
             "Made from: " + ", ".join(f"`roofserve {m['command']}` ({m['created']})" for m in metas) + ".", ""]
    if any(r["kind"].startswith("vision") for r in rows):
        lines += vision_section(rows, out, machine.get("cores"))
    if any(r["kind"].startswith("llm") for r in rows):
        lines += llm_section(rows, out, machine.get("cores"))
    skipped = [item for m in metas for item in m.get("config", {}).get("skipped", [])]
    if skipped:
        lines += ["Skipped on this machine: " + "; ".join(f"{i['step']} ({i['why']})" for i in skipped) + ".", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
