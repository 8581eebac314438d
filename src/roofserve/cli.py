"""roofserve: one entry point. Subcommands: serve, peak, bench, sweep, report."""

from __future__ import annotations

import argparse
import logging
import sys

from roofserve.config import LLMConfig, VisionConfig, add_config_args, load_toml, make_config
from roofserve.errors import UserError


def _layers(args: argparse.Namespace, cls: type, section: str | None = None):
    """Defaults < config file < CLI flags."""
    file_layer = None
    if args.config:
        doc = load_toml(args.config)
        file_layer = doc.get(section, doc) if section else doc
    cli_layer = {k: v for k, v in vars(args).items() if k in cls.__dataclass_fields__}
    return make_config(cls, file_layer, cli_layer)


def cmd_serve_vision(args: argparse.Namespace) -> int:
    from roofserve.vision.serve import serve

    serve(_layers(args, VisionConfig, "server"))
    return 0


def cmd_serve_llm(args: argparse.Namespace) -> int:
    from roofserve.llm.serve import serve

    serve(_layers(args, LLMConfig, "server"))
    return 0


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _save(out: str, command: str, config: dict, rows: list[dict]) -> None:
    from roofserve.bench.results import run_meta, write_results

    path = write_results(out, run_meta(command, config), rows)
    print(f"results: {path}")


def _table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(w) for c, w in zip(columns, widths)))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.1f}"
    return "-" if value is None else str(value)


def cmd_peak(args: argparse.Namespace) -> int:
    from roofserve.hardware import datasheet_for, describe_machine, measure_peaks
    from roofserve.vision.model import resolve_device

    device = resolve_device(args.device)
    machine = describe_machine()
    print(f"{machine['cpu']} ({machine['cores']} cores){', ' + machine['gpu'] if machine['gpu'] else ''}")
    rows = [p.row() for p in measure_peaks(device)]
    if device.type == "cpu":  # what `--gemv roofserve` streams at most (needs g++; built on first use)
        from roofserve.llm.kernels import measure_gemv_peak

        try:
            rows.append(measure_gemv_peak().row())
        except UserError as e:
            print(f"note: no gemv-bf16-roofserve row: {e}")
    sheet = datasheet_for(machine["gpu"])
    for row in rows:
        if sheet and device.type == "cuda":
            key = "bandwidth_gb_s" if row["resource"] == "bandwidth" else row["name"]
            row["datasheet"] = sheet[1].get(key)
    _table(rows, ["resource", "name", "device", "value", "unit", "datasheet"])
    if args.out:
        _save(args.out, "peak", {"device": str(device), "datasheet": sheet[0] if sheet else None}, rows)
    return 0


def cmd_bench_vision_model(args: argparse.Namespace) -> int:
    import torch

    from roofserve.bench.vision import bench_model, bench_pipeline, example_images
    from roofserve.hardware import measure_peaks
    from roofserve.vision.model import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    rows = [] if args.no_peak else [p.row() for p in measure_peaks(device)]
    rows += bench_model(args.model, args.weights, args.precisions.split(","), args.batch_sizes, args.device,
                        args.channels_last, args.compile, args.min_time_s, rows)
    _table([r for r in rows if r["kind"] == "vision-model"],
           ["precision", "batch_size", "img_per_s", "achieved_tflops", "mfu", "compute_roof_img_per_s"])
    if args.pipeline_batch_sizes:
        pipe = bench_pipeline(args.model, args.weights, args.pipeline_precision, args.pipeline_batch_sizes,
                              example_images(args.images), args.device, args.channels_last, args.min_time_s)
        _table(pipe, ["precision", "batch_size", "lanes", "threads", "img_per_s", "decode_ms_per_image"])
        rows += pipe
    _save(args.out, "bench vision-model", {k: v for k, v in vars(args).items() if k != "func"}, rows)
    return 0


def cmd_bench_vision_api(args: argparse.Namespace) -> int:
    from roofserve.bench.vision import bench_api, example_images

    rows = bench_api(args.url, example_images(args.images), args.payload, args.concurrency, args.rate or [],
                     args.requests, args.duration_s, args.warmup, args.api_key)
    for row in rows:
        row["step"] = args.label
    _table(rows, ["mode", "concurrency", "rate_per_s", "req_per_s", "latency_p50_ms", "latency_p99_ms", "errors",
                  "cpu_percent", "gpu_percent"])
    _save(args.out, "bench vision-api", {k: v for k, v in vars(args).items() if k not in ("func", "api_key")}, rows)
    return 0


def cmd_sweep_vision(args: argparse.Namespace) -> int:
    import torch

    from roofserve.bench.sweep import load_ladder, run_ladder
    from roofserve.bench.vision import bench_model, bench_pipeline, example_images
    from roofserve.hardware import measure_peaks

    doc, steps = load_ladder(args.ladder, {"requests": args.requests, "concurrency": args.concurrency})
    images = example_images(args.images)
    first = steps[0].config
    model = doc.get("model", {})
    rows = [p.row() for p in measure_peaks(torch.device("cuda" if first.device == "cuda" else "cpu"))]
    if not args.skip_model:
        print("measuring the ceilings: model-only and in-process pipeline ...")
        rows += bench_model(first.model, first.weights, model.get("precisions", ["fp32", "bf16"]),
                            model.get("batch_sizes", [1, 8, 32]), first.device, True, False,
                            model.get("min_time_s", 1.0), rows)
        rows += bench_pipeline(first.model, first.weights, model.get("pipeline_precision", "auto"),
                               model.get("pipeline_batch_sizes", [8, 32]), images, first.device, True,
                               model.get("min_time_s", 1.0))
    rows += run_ladder(doc, steps, images)
    _table([r for r in rows if r["kind"] == "vision-api"],
           ["step", "concurrency", "req_per_s", "latency_p50_ms", "latency_p99_ms", "errors", "cpu_percent"])
    _save(args.out, "sweep vision", {"ladder": args.ladder, "doc": doc}, rows)
    if args.report:
        from roofserve.report.markdown import build_report

        print(f"report: {build_report([args.out], args.report)}")
    return 0


def cmd_bench_llm(args: argparse.Namespace) -> int:
    from roofserve.bench.llm import LONG_PROMPT, bench_llm_api, result_rows

    prompt = LONG_PROMPT if not args.prompt_words else " ".join(["word"] * args.prompt_words) + ". " + LONG_PROMPT
    rows = []
    for concurrency in args.concurrency:
        row, results = bench_llm_api(args.url, args.model, prompt, args.max_tokens, args.runs, concurrency,
                                     args.ignore_eos, args.warmup, args.api_key)
        row["step"] = args.label
        rows.append(row)
        rows += [{"kind": "llm-request", "concurrency": concurrency, **r} for r in result_rows(results)]
    _table([r for r in rows if r["kind"] == "llm-api"],
           ["concurrency", "ok", "errors", "output_tokens_mean", "decode_tokens_per_s", "output_tokens_per_s",
            "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99", "fixed_length_verified"])
    _save(args.out, "bench llm", {k: v for k, v in vars(args).items() if k not in ("func", "api_key")}, rows)
    return 0


def cmd_bench_llm_engine(args: argparse.Namespace) -> int:
    from roofserve.bench.llm import bench_llm_engine
    from roofserve.llm.roof import step_roof
    from roofserve.llm.runtime import build_in_process

    cfg = _layers(args, LLMConfig, "server")
    generator, _ = build_in_process(cfg)
    rows = bench_llm_engine(generator, args.prompt_lengths, args.max_tokens, args.runs)
    roof = step_roof(cfg, max(args.prompt_lengths) + args.max_tokens // 2, args.bandwidth_gb_s)
    rows = [{**r, **roof, "step": args.label} for r in rows]
    _table(rows, ["prompt", "prompt_tokens", "ttft_ms", "prefill_tokens_per_s", "decode_tokens_per_s", "weight_format",
                  "roof_tokens_per_s"])
    _save(args.out, "bench llm-engine", {k: v for k, v in vars(args).items() if k != "func"}, rows)
    return 0


def cmd_bench_soak(args: argparse.Namespace) -> int:
    import shlex

    import httpx

    from roofserve.bench.process import start_server, stop_process_group
    from roofserve.bench.soak import llm_cases, soak, vision_cases
    from roofserve.bench.vision import example_images

    server = start_server([args.server, *shlex.split(args.server_args)], ready_timeout_s=900)
    try:
        cfg = httpx.get(server.url + "/info", timeout=10).json()["model"]["config"]  # the caps the server runs with
        cases = (vision_cases(example_images(), cfg["max_payload_bytes"]) if args.server == "vision"
                 else llm_cases(cfg["max_seq_len"], cfg["max_payload_bytes"]))
        rows = soak(server, cases, args.duration_s, args.concurrency, args.server, args.warmup_s, args.rss_tolerance)
    finally:
        exit_code = stop_process_group(server.proc)
    rows[0]["server_exit_code"] = exit_code
    _table(rows[1:], ["case", "good", "requests", "statuses"])
    _table(rows[:1], ["server", "requests", "good_requests", "good_5xx", "bad_requests", "bad_4xx", "rss_start_mb",
                      "rss_warm_mb", "rss_end_mb", "rss_growth_pct", "passed"])
    config = {k: v for k, v in vars(args).items() if k != "func"}
    _save(args.out or f"results/soak-{args.server}.json", "bench soak", config, rows)
    return 0 if rows[0]["passed"] and exit_code == 0 else 1


def cmd_sweep_llm(args: argparse.Namespace) -> int:
    import torch

    from roofserve.bench.sweep import load_ladder, run_llm_ladder
    from roofserve.hardware import measure_bandwidth_gb_s

    doc, steps = load_ladder(args.ladder, {"runs": args.runs, "max_tokens": args.max_tokens}, LLMConfig)
    device = torch.device("cuda" if steps[0].config.device == "cuda" else "cpu")
    peaks = [p.row() for p in measure_bandwidth_gb_s(device)]
    read = next(p["value"] for p in peaks if p["name"] == "read")
    print(f"measured read bandwidth: {read:.1f} GB/s")
    from roofserve.llm.serve import preflight

    runnable, skipped = [], []
    for step in steps:  # a step this machine cannot run (llama.cpp missing, bnb4 without CUDA) is skipped
        try:
            preflight(step.config)
            runnable.append(step)
        except UserError as e:
            skipped.append({"step": step.name, "why": str(e)})
            print(f"skipping {step.name}: {e}")
    steps = runnable
    rows = peaks + run_llm_ladder(steps, read)
    _table([r for r in rows if r["kind"] == "llm-api"],
           ["step", "decode_tokens_per_s", "ttft_ms_p50", "tpot_ms_p50", "weight_format", "roof_tokens_per_s"])
    _save(args.out, "sweep llm", {"ladder": args.ladder, "doc": doc, "skipped": skipped}, rows)
    if args.report:
        from roofserve.report.markdown import build_report

        print(f"report: {build_report([args.out], args.report)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from roofserve.report.markdown import build_report

    print(f"report: {build_report(args.results, args.out)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Serve the default classifier, classify the example images over HTTP, run the ladder, write the report."""
    import json
    import urllib.request

    from roofserve.bench.process import running_server
    from roofserve.bench.vision import example_images

    print("1/4 starting the vision server on 127.0.0.1 with the default EfficientNet-Lite0 ...")
    with running_server(["vision"]) as url:
        for name, data in example_images():
            ctype = "image/png" if name.endswith(".png") else "image/jpeg"
            request = urllib.request.Request(url + "/predict", data=data, headers={"Content-Type": ctype})
            with urllib.request.urlopen(request, timeout=60) as response:
                out = json.loads(response.read())
            breed = f", breed {out['breeds'][0]['breed']}" if out["animal"] == "dog" else ""
            print(f"    {name:24s} -> {out['animal']} ({out['confidence']:.2f}){breed}; top class {out['top_classes'][0]['label']}")
    print(f"2/4 running the optimization ladder {args.ladder} (a few minutes) ...")
    sweep = argparse.Namespace(ladder=args.ladder, requests=args.requests, concurrency=args.concurrency, images=None,
                               skip_model=False, out=f"{args.out}/vision-sweep.json", report=f"{args.out}/report")
    cmd_sweep_vision(sweep)
    print("3/4 starting the chat server (SmolLM2-135M-Instruct, OpenAI-compatible) and asking it ...")
    from roofserve.bench.llm import bench_llm_api

    with running_server(["llm", "--max-seq-len", "512"]) as url:
        body = json.dumps({"messages": [{"role": "user", "content": "What is the capital of France?"}],
                           "max_tokens": 32, "temperature": 0}).encode()
        request = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
        print(f"    Q: What is the capital of France?  A: {answer['choices'][0]['message']['content']!r}")
        row, _ = bench_llm_api(url + "/v1/chat/completions", max_tokens=64, runs=3, progress=False)
        print(f"    streaming, 64 tokens: {row['decode_tokens_per_s']} tok/s decode, TTFT p50 {row['ttft_ms_p50']:.0f} ms "
              "(bf16 eager; `make bench-llm` runs the whole LLM ladder)")
    print(f"4/4 done: results in {args.out}/, report in {args.out}/report/report.md")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="roofserve",
        description="Serve models with LitServe and measure how close they run to the hardware's roof.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser("serve", help="start a model server").add_subparsers(dest="what", metavar="MODEL", required=True)
    p = serve.add_parser(
        "vision",
        help="cat-vs-dog and dog-breed image classifier (POST /predict)",
        description="Serve an ImageNet classifier that answers cat / dog / other and the dog breed. "
        "POST /predict with raw image bytes (Content-Type: image/jpeg|png|webp), a multipart file upload, "
        "or JSON {\"image\": \"<base64>\"}.",
    )
    p.add_argument("--config", metavar="TOML", help="config file; its [server] table (or top level) sets these flags")
    add_config_args(p, VisionConfig)
    p.set_defaults(func=cmd_serve_vision)
    p = serve.add_parser(
        "llm",
        help="Llama-family chat model, OpenAI-compatible (POST /v1/chat/completions, GET /v1/models)",
        description="Serve a Llama-family chat model with an OpenAI-compatible API, one request at a time "
        "(no batching), streaming (SSE) and not. The default is SmolLM2-135M-Instruct from the bundled GGUF.",
    )
    p.add_argument("--config", metavar="TOML", help="config file; its [server] table (or top level) sets these flags")
    add_config_args(p, LLMConfig)
    p.set_defaults(func=cmd_serve_llm)

    p = sub.add_parser("peak", help="measure this machine's matmul FLOP/s and memory bandwidth")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    p.add_argument("--out", help="also write the rows to this JSON file")
    p.set_defaults(func=cmd_peak)

    bench = sub.add_parser("bench", help="run a benchmark").add_subparsers(dest="what", metavar="BENCH", required=True)
    p = bench.add_parser("vision-model", help="model-only img/s per batch size and precision, and the in-process pipeline")
    p.add_argument("--model", default="tf_efficientnet_lite0", help="timm model name (default: tf_efficientnet_lite0)")
    p.add_argument("--weights", default=None, help="as in serve vision; 'random' is fine for speed")
    p.add_argument("--device", default="auto")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated (default: fp32,bf16)")
    p.add_argument("--batch-sizes", type=_ints, default=[1, 2, 4, 8, 16, 32, 64, 128, 256], help="comma-separated")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    p.add_argument("--min-time-s", type=float, default=1.0, help="time each point for at least this long")
    p.add_argument("--pipeline-batch-sizes", type=_ints, default=[1, 8, 32], help="'' to skip the pipeline")
    p.add_argument("--pipeline-precision", default="auto")
    p.add_argument("--images", help="folder of images for the pipeline (default: the bundled examples)")
    p.add_argument("--no-peak", action="store_true", help="skip measuring peaks (MFU needs them)")
    p.add_argument("--out", default="results/vision-model.json")
    p.set_defaults(func=cmd_bench_vision_model)

    p = bench.add_parser("vision-api", help="load-test a classifier URL: concurrency sweep and Poisson rates")
    p.add_argument("--url", default="http://127.0.0.1:8000/predict")
    p.add_argument("--payload", default="raw", choices=["raw", "base64", "multipart"])
    p.add_argument("--concurrency", type=_ints, default=[1, 8, 32, 64], help="closed-loop levels (comma-separated)")
    p.add_argument("--rate", type=_floats, default=None, help="open-loop Poisson rates in req/s (comma-separated)")
    p.add_argument("--requests", type=int, default=400, help="requests per level (after warm-up)")
    p.add_argument("--duration-s", type=float, default=60.0, help="cap on each level's duration")
    p.add_argument("--warmup", type=int, default=16, help="requests sent before each level's clock starts")
    p.add_argument("--images", help="folder of images to send (default: the bundled examples)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--label", default="manual", help="step name stored in each row")
    p.add_argument("--out", default="results/vision-api.json")
    p.set_defaults(func=cmd_bench_vision_api)

    p = bench.add_parser("llm", help="stream chat requests to an OpenAI-compatible URL: TTFT, TPOT, ITL, tokens/s")
    p.add_argument("--url", default="http://127.0.0.1:8000/v1/chat/completions")
    p.add_argument("--model", default="", help="model name to send (llama.cpp and vLLM servers check it)")
    p.add_argument("--runs", type=int, default=10, help="requests per concurrency level")
    p.add_argument("--concurrency", type=_ints, default=[1], help="1 = synchronous, the no-batching mode")
    p.add_argument("--max-tokens", type=int, default=128, help="output length")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="ask for exactly max-tokens (vLLM/roofserve extension); the row says if usage confirmed it")
    p.add_argument("--prompt-words", type=int, default=0, help="prepend this many words to lengthen the prompt")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--api-key", default=None)
    p.add_argument("--label", default="manual")
    p.add_argument("--out", default="results/llm-api.json")
    p.set_defaults(func=cmd_bench_llm)

    p = bench.add_parser("llm-engine", help="the serving engine in-process: prefill and decode tokens/s, no HTTP")
    p.add_argument("--config", metavar="TOML", help="config file with the server's settings")
    add_config_args(p, LLMConfig)
    p.add_argument("--prompt-lengths", type=_ints, default=[32, 256, 1024])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--bandwidth-gb-s", type=float, default=None, help="for the roof (from `roofserve peak`)")
    p.add_argument("--label", default="manual")
    p.add_argument("--out", default="results/llm-engine.json")
    p.set_defaults(func=cmd_bench_llm_engine)

    p = bench.add_parser(
        "soak", help="mixed good and bad requests for a while against a server it starts; checks 5xx and memory",
        description="Start a server on 127.0.0.1, send it good and malformed requests round-robin for "
        "--duration-s after a warm-up, and sample the memory of its process tree. Passes (exit 0) when no "
        "good request failed, every bad one got a 4xx, memory grew at most --rss-tolerance after the "
        "warm-up, and the server stopped cleanly on SIGTERM.",
    )
    p.add_argument("server", choices=["vision", "llm"])
    p.add_argument("--duration-s", type=float, default=180.0, help="measured part of the run (default: 180)")
    p.add_argument("--warmup-s", type=float, default=15.0, help="traffic before the memory baseline (default: 15)")
    p.add_argument("--concurrency", type=int, default=4, help="client threads (default: 4)")
    p.add_argument("--server-args", default="",
                   help='flags for `roofserve serve SERVER`, written with =: --server-args="--max-seq-len 512"')
    p.add_argument("--rss-tolerance", type=float, default=0.05, help="allowed memory growth (default: 0.05 = 5%%)")
    p.add_argument("--out", default=None, help="JSON rows (default: results/soak-SERVER.json)")
    p.set_defaults(func=cmd_bench_soak)

    sweep = sub.add_parser("sweep", help="run a ladder of server configs").add_subparsers(dest="what", metavar="LADDER", required=True)
    p = sweep.add_parser("vision", help="start the vision server with each step's config, load it, stop it")
    p.add_argument("ladder", nargs="?", default="experiments/vision-cpu.toml", help="ladder TOML (default: %(default)s)")
    p.add_argument("--requests", type=int, default=None, help="override requests per level")
    p.add_argument("--concurrency", type=_ints, default=None, help="override concurrency levels")
    p.add_argument("--images", help="folder of images to send (default: the bundled examples)")
    p.add_argument("--skip-model", action="store_true", help="skip the model-only and pipeline ceilings")
    p.add_argument("--out", default="results/vision-sweep.json")
    p.add_argument("--report", default=None, metavar="DIR", help="also write the Markdown report into DIR")
    p.set_defaults(func=cmd_sweep_vision)

    p = sweep.add_parser("llm", help="start the LLM server with each step's config, stream requests, stop it")
    p.add_argument("ladder", nargs="?", default="experiments/llm-cpu.toml", help="ladder TOML (default: %(default)s)")
    p.add_argument("--runs", type=int, default=None, help="override requests per step")
    p.add_argument("--max-tokens", type=int, default=None, help="override output length")
    p.add_argument("--out", default="results/llm-sweep.json")
    p.add_argument("--report", default=None, metavar="DIR", help="also write the Markdown report into DIR")
    p.set_defaults(func=cmd_sweep_llm)

    p = sub.add_parser("demo", help="serve the default classifier, classify examples, run the ladder, write a report")
    p.add_argument("--ladder", default="experiments/vision-cpu.toml")
    p.add_argument("--requests", type=int, default=200, help="requests per load level (default: %(default)s)")
    p.add_argument("--concurrency", type=_ints, default=[1, 16, 64], help="load levels (default: 1,16,64)")
    p.add_argument("--out", default="results/demo")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("report", help="turn result files into a Markdown report with PNG plots")
    p.add_argument("results", nargs="+", help="result JSON files or folders")
    p.add_argument("--out", default="results/report", help="folder for report.md and the plots")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.verbose else logging.WARNING)  # a line per request
    try:
        if args.command in ("bench", "sweep", "demo", "peak"):
            from roofserve.server import reexec_with, tuned_environ

            reexec_with(tuned_environ("glibc-tuned"))  # the same malloc the servers use
        return args.func(args)
    except UserError as e:
        print(f"roofserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
