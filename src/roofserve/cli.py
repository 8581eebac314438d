"""roofserve: one entry point. Subcommands: serve, peak, bench, sweep, report, demo.

This module parses and calls; the work lives in server/, vision/, llm/ (servers), measure/
(in-process), load/ (client side) and sweep/ (ladders). Flags of configs are generated from the
config classes in config.py, where each default is written once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from roofserve.config import (
    DEFAULT_VISION_MODEL,
    K8sConfig,
    LLMConfig,
    LLMDatasetConfig,
    LLMEngineBenchConfig,
    LLMLoadConfig,
    LLMServeBenchConfig,
    VisionCeilingsConfig,
    VisionConfig,
    VisionLoadConfig,
    add_config_args,
    as_dict,
    config_from_args,
    load_toml,
    make_config,
)
from roofserve.errors import UserError


def _server_config(args: argparse.Namespace, cls: type):
    """Defaults < config file's [server] table (or top level) < CLI flags."""
    file_layer = None
    if args.config:
        doc = load_toml(args.config)
        file_layer = doc.get("server", doc)
    return make_config(cls, file_layer, config_from_args(args, cls))


def _save(out: str, command: str, config: dict, rows: list[dict]) -> None:
    from roofserve.results import run_meta, write_results

    print(f"results: {write_results(out, run_meta(command, config), rows)}")


def _table(rows: list[dict], columns: list[str]) -> None:
    if not rows:
        return
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(w) for c, w in zip(columns, widths)))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.1f}"
    return "-" if value is None else str(value)


def _report(paths: list[str], out: str | None) -> None:
    if out:
        from roofserve.report.markdown import build_report

        print(f"report: {build_report(paths, out)}")


def cmd_deploy_k8s(args: argparse.Namespace) -> int:
    """The manifests for `roofserve serve WHAT` with these knobs: a config file's [server] and [k8s]
    tables, then flags."""
    from roofserve.platforms.k8s import render, to_yaml

    doc = load_toml(args.config) if args.config else {}
    server_layer = doc.get("server", {k: v for k, v in doc.items() if k != "k8s"})
    cls = VisionConfig if args.what == "vision" else LLMConfig
    server = make_config(cls, server_layer, config_from_args(args, cls))
    k8s = make_config(K8sConfig, doc.get("k8s"), config_from_args(args, K8sConfig))
    text = to_yaml(render(args.what, server, k8s))
    if args.out == "-":
        print(text, end="")
    else:
        from pathlib import Path

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"manifests: {args.out} (kubectl apply -f {args.out})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    if args.what == "vision":
        from roofserve.vision.serve import serve

        serve(_server_config(args, VisionConfig))
    else:
        from roofserve.llm.serve import serve

        serve(_server_config(args, LLMConfig))
    return 0


def cmd_peak(args: argparse.Namespace) -> int:
    from roofserve.device import resolve_device
    from roofserve.machine import datasheet_for, describe_machine
    from roofserve.measure.peaks import measure_peaks

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

    from roofserve.device import resolve_device
    from roofserve.examples import example_images
    from roofserve.measure.peaks import measure_peaks
    from roofserve.measure.vision import measure_ceilings

    ceilings = make_config(VisionCeilingsConfig, config_from_args(args, VisionCeilingsConfig))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    rows = [] if args.no_peak else [p.row() for p in measure_peaks(device)]
    rows += measure_ceilings(args.model, args.weights, device.type, ceilings, example_images(args.images), rows)
    _table([r for r in rows if r["kind"] == "vision-model"],
           ["runtime", "precision", "batch_size", "img_per_s", "achieved_tflops", "mfu", "compute_roof_img_per_s"])
    _table([r for r in rows if r["kind"] == "vision-accuracy"],
           ["runtime", "precision", "top1_agree", "animal_agree", "photos", "mean_abs_prob_diff", "passed"])
    _table([r for r in rows if r["kind"] == "vision-decode"],
           ["image", "format", "width", "height", "progressive", "bytes", "decode_ms"])
    _table([r for r in rows if r["kind"] == "vision-pipeline"],
           ["runtime", "precision", "batch_size", "lanes", "threads", "img_per_s", "decode_ms_per_image"])
    config = {"model": args.model, "weights": args.weights, "device": device.type, **as_dict(ceilings)}
    _save(args.out, "bench vision-model", config, rows)
    return 0


def cmd_bench_vision_api(args: argparse.Namespace) -> int:
    from roofserve.examples import example_images
    from roofserve.load.vision import bench_api

    load = make_config(VisionLoadConfig, config_from_args(args, VisionLoadConfig))
    rows = bench_api(args.url, example_images(args.images), load, args.api_key or os.environ.get("ROOFSERVE_API_KEY"))
    for row in rows:
        row["step"] = args.label
    _table(rows, ["mode", "concurrency", "rate_per_s", "req_per_s", "latency_p50_ms", "latency_p99_ms", "errors",
                  "cpu_percent", "gpu_percent"])
    _save(args.out, "bench vision-api", {"url": args.url, "label": args.label, **as_dict(load)}, rows)
    return 0


def cmd_bench_llm(args: argparse.Namespace) -> int:
    from roofserve.load.llm import bench_llm_levels

    load = make_config(LLMLoadConfig, config_from_args(args, LLMLoadConfig))
    rows = bench_llm_levels(args.url, args.model, load, args.api_key or os.environ.get("ROOFSERVE_API_KEY"))
    for row in rows:
        row["step"] = args.label
    _table([r for r in rows if r["kind"] == "llm-api"],
           ["concurrency", "ok", "errors", "output_tokens_mean", "decode_tokens_per_s", "output_tokens_per_s",
            "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "fixed_length_verified"])
    _save(args.out, "bench llm", {"url": args.url, "model": args.model, "label": args.label, **as_dict(load)}, rows)
    return 0


def _requests(cfg):
    from roofserve.load.datasets import load_sharegpt, synthetic

    if getattr(cfg, "dataset", None):
        return load_sharegpt(cfg.dataset, cfg.num_prompts, seed=cfg.seed)
    return synthetic(cfg.num_prompts, cfg.input_len, cfg.output_len, cfg.len_dist, cfg.len_spread, cfg.seed)


def cmd_dataset(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from roofserve.load.datasets import to_sharegpt

    cfg = make_config(LLMDatasetConfig, config_from_args(args, LLMDatasetConfig))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(to_sharegpt(_requests(cfg)), indent=1))
    print(f"dataset: {args.out} ({cfg.num_prompts} conversations, ShareGPT format)")
    return 0


def cmd_bench_llm_serve(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from roofserve.load.llm import bench_llm_serve, request_rows, vllm_result

    cfg = make_config(LLMServeBenchConfig, config_from_args(args, LLMServeBenchConfig))
    requests = _requests(cfg)
    api_key = args.api_key or os.environ.get("ROOFSERVE_API_KEY")
    row, results = bench_llm_serve(args.url, requests, cfg, args.model, api_key)
    row["step"] = args.label
    _table([row], ["ok", "errors", "wall_s", "req_per_s", "goodput_req_per_s", "output_tokens_per_s",
                   "ttft_mean_ms", "ttft_p99_ms", "tpot_mean_ms", "tpot_p99_ms", "itl_mean_ms", "latency_mean_ms"])
    if cfg.result_format == "vllm":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(vllm_result(row, results, args.model, requests), indent=1))
        print(f"results: {args.out} (vllm bench serve's format)")
    else:
        concurrency = cfg.max_concurrency or len(requests)
        rows = [row, *request_rows(results, concurrency)]
        _save(args.out, "bench llm-serve", {"url": args.url, "model": args.model, "label": args.label,
                                            **as_dict(cfg)}, rows)
    return 0 if row["ok"] else 1


def cmd_bench_llm_engine(args: argparse.Namespace) -> int:
    from roofserve.llm.runtime import build_in_process
    from roofserve.load.llm import chat_prompt
    from roofserve.measure.llm import bench_llm_engine
    from roofserve.measure.llm_roof import step_roof

    cfg = _server_config(args, LLMConfig)
    bench = make_config(LLMEngineBenchConfig, config_from_args(args, LLMEngineBenchConfig))
    start = time.perf_counter()
    generator, _ = build_in_process(cfg)
    startup_s = round(time.perf_counter() - start, 1)  # load, and compile where asked (the warm-up)
    rows = bench_llm_engine(generator, bench.prompt_lengths, bench.max_tokens, bench.runs, chat_prompt())
    roof = step_roof(cfg, max(bench.prompt_lengths) + bench.max_tokens // 2, args.bandwidth_gb_s)
    rows = [{**r, **roof, "startup_s": startup_s, "step": args.label} for r in rows]
    _table(rows, ["prompt", "prompt_tokens", "ttft_ms", "prefill_tokens_per_s", "decode_tokens_per_s", "weight_format",
                  "roof_tokens_per_s"])
    _save(args.out, "bench llm-engine", {"server": as_dict(cfg), **as_dict(bench), "label": args.label}, rows)
    return 0


def cmd_bench_gguf(args: argparse.Namespace) -> int:
    from roofserve.measure.gguf_bench import bench_gguf, random_file, summarize

    files = [Path(f) for f in args.files]
    for f in files:
        if not f.is_file():
            raise UserError(f"GGUF file not found: {f}")
    files += [random_file(shape, kind) for shape in args.shapes for kind in args.types]
    if not files:
        raise UserError("nothing to run: pass GGUF files, or --shapes and --types")

    def progress(row):
        print(f"  {row['file']} round {row['round']} {row['engine']}: decode {row['decode_tokens_per_s']} tok/s "
              f"({row['share_of_dram']:.0%} of {row['dram_read_gb_s']} GB/s), prefill {row['prefill_tokens_per_s']} "
              f"tok/s, peak RSS {row['peak_rss_gb']} GB", flush=True)

    rows = bench_gguf(files, args.prompt_tokens, args.max_tokens, args.rounds, args.threads, progress=progress)
    summary = summarize(rows)
    _table(summary, ["file", "decode_ours", "decode_llama_cpp", "decode_x", "prefill_ours", "prefill_llama_cpp",
                     "prefill_x", "dram_share_ours", "dram_share_llama_cpp", "rss_gb_ours", "rss_gb_llama_cpp"])
    _save(args.out, "bench gguf", {"files": [str(f) for f in files], "prompt_tokens": args.prompt_tokens,
                                   "max_tokens": args.max_tokens, "rounds": args.rounds, "threads": args.threads},
          rows + summary)
    return 0


def cmd_bench_soak(args: argparse.Namespace) -> int:
    from roofserve.load.soak import run_soak

    if args.stalled < 0:
        raise UserError("--stalled must be >= 0")
    rows, exit_code = run_soak(args.server, args.server_args, args.duration_s, args.concurrency, args.warmup_s,
                               args.rss_tolerance, args.stalled)
    _table(rows[1:], ["case", "good", "requests", "statuses"])
    _table(rows[:1], ["server", "requests", "good_requests", "good_5xx", "bad_requests", "bad_4xx", "rss_start_mb",
                      "rss_warm_mb", "rss_end_mb", "rss_growth_pct", "passed"])
    if args.stalled:
        _table(rows[:1], ["stalled", "stalled_opened", "stalled_ended", "stalled_held_max_s", "stalled_late"])
    config = {k: v for k, v in vars(args).items() if k != "func"}
    _save(args.out or f"results/soak-{args.server}.json", "bench soak", config, rows)
    return 0 if rows[0]["passed"] and exit_code == 0 else 1


def cmd_bench_crowd(args: argparse.Namespace) -> int:
    import shlex

    from roofserve.load.crowd import bench_under_crowd

    for name in ("stalled", "concurrency", "requests", "rounds"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1")
    rows, exit_code = bench_under_crowd(shlex.split(args.server_args), args.stalled, args.concurrency, args.requests,
                                        args.rounds)
    _table(rows[:-1], ["round", "stalled", "requests", "ok", "req_per_s", "latency_p50_ms", "latency_p99_ms",
                       "stalled_opened", "stalled_late"])
    _table(rows[-1:], ["stalled", "latency_p99_ms_undisturbed", "latency_p99_ms_stalled", "p99_ratio", "all_ok",
                       "stalled_late", "passed"])
    config = {k: v for k, v in vars(args).items() if k != "func"}
    _save(args.out, "bench crowd", config, rows)
    return 0 if rows[-1]["passed"] and exit_code == 0 else 1


def cmd_bench_fleet(args: argparse.Namespace) -> int:
    import shlex

    from roofserve.examples import example_images
    from roofserve.load.fleet import rolling_restart
    from roofserve.load.vision import image_sender

    if args.concurrency < 1:
        raise UserError("--concurrency must be >= 1")
    images = example_images(args.images)
    row = rolling_restart(["vision", *shlex.split(args.server_args)], lambda: image_sender(images, "raw"),
                          args.replicas, args.concurrency)
    _table([row], ["replicas", "requests", "ok", "errors", "status_5xx", "req_per_s", "latency_p99_ms", "passed"])
    _table(row["restarts"], ["replica", "exit_code", "stop_s", "back_in_balancer_s"])
    if row["error_kinds"]:
        print("errors:", row["error_kinds"])
    _save(args.out, "bench fleet", {k: v for k, v in vars(args).items() if k != "func"}, [row])
    return 0 if row["passed"] else 1


def cmd_sweep_vision(args: argparse.Namespace) -> int:
    from roofserve.examples import example_images
    from roofserve.sweep.vision import sweep_vision

    overrides = {"requests": args.requests, "concurrency": args.concurrency}
    ladder, rows = sweep_vision(args.ladder, overrides, example_images(args.images), args.skip_model)
    _table([r for r in rows if r["kind"] == "vision-api"],
           ["step", "concurrency", "req_per_s", "latency_p50_ms", "latency_p99_ms", "errors", "cpu_percent"])
    _save(args.out, "sweep vision", {"ladder": args.ladder, "doc": ladder.doc}, rows)
    _report([args.out], args.report)
    return 0


def cmd_sweep_llm(args: argparse.Namespace) -> int:
    from roofserve.sweep.llm import sweep_llm

    ladder, rows, skipped = sweep_llm(args.ladder, {"runs": args.runs, "max_tokens": args.max_tokens,
                                                    "concurrency": args.concurrency})
    for item in skipped:
        print(f"skipped {item['step']}: {item['why']}")
    _table([r for r in rows if r["kind"] == "llm-api"],
           ["step", "concurrency", "decode_tokens_per_s", "output_tokens_per_s", "ttft_p50_ms", "tpot_p50_ms",
            "weight_format", "roof_tokens_per_s"])
    _save(args.out, "sweep llm", {"ladder": args.ladder, "doc": ladder.doc, "skipped": skipped}, rows)
    _report([args.out], args.report)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    _report(args.results, args.out)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from roofserve.demo import demo

    demo(args.ladder, args.requests, args.concurrency, args.out)
    return 0


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


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
    p.set_defaults(func=cmd_serve)
    p = serve.add_parser(
        "llm",
        help="Llama-family chat model, OpenAI-compatible (POST /v1/chat/completions, GET /v1/models)",
        description="Serve a Llama-family chat model with an OpenAI-compatible API, streaming (SSE) and not: "
        "many requests in a continuous batch (--max-batch-size), or one at a time (--max-batch-size 1). "
        "The default is SmolLM2-135M-Instruct from the bundled GGUF.",
    )
    p.add_argument("--config", metavar="TOML", help="config file; its [server] table (or top level) sets these flags")
    add_config_args(p, LLMConfig)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("peak", help="measure this machine's matmul FLOP/s and memory bandwidth")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when a GPU is visible; default: auto)")
    p.add_argument("--out", help="also write the rows to this JSON file")
    p.set_defaults(func=cmd_peak)

    deploy = sub.add_parser("deploy", help="render deployment manifests from a server config")
    deploy = deploy.add_subparsers(dest="target", metavar="TARGET", required=True)
    k8s = deploy.add_parser("k8s", help="Kubernetes: Deployment, Service, HorizontalPodAutoscaler, PodDisruptionBudget")
    k8s = k8s.add_subparsers(dest="what", metavar="MODEL", required=True)
    for what, cls in (("vision", VisionConfig), ("llm", LLMConfig)):
        p = k8s.add_parser(what, help=f"manifests for `roofserve serve {what}`",
                           description=f"Render Kubernetes manifests that run `roofserve serve {what}` with the "
                           "given server knobs (the same flags and [server] table as serve), plus the [k8s] "
                           "table or flags below. The container's args are the config's own flags.")
        p.add_argument("--config", metavar="TOML", help="config file with a [server] and a [k8s] table")
        add_config_args(p, cls)
        add_config_args(p, K8sConfig)
        p.add_argument("--out", default="-", help="file to write, or - for stdout (default: %(default)s)")
        p.set_defaults(func=cmd_deploy_k8s)

    bench = sub.add_parser("bench", help="run a benchmark").add_subparsers(dest="what", metavar="BENCH", required=True)
    p = bench.add_parser("vision-model", help="model-only img/s per batch size and precision, and the in-process pipeline")
    p.add_argument("--model", default=DEFAULT_VISION_MODEL, help="timm model name (default: %(default)s)")
    p.add_argument("--weights", default=None, help="as in serve vision; 'random' is fine for speed")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    p.add_argument("--images", help="folder of images for the pipeline (default: the bundled examples)")
    p.add_argument("--no-peak", action="store_true", help="skip measuring peaks (MFU needs them)")
    add_config_args(p, VisionCeilingsConfig)
    p.add_argument("--out", default="results/vision-model.json")
    p.set_defaults(func=cmd_bench_vision_model)

    p = bench.add_parser("vision-api", help="load-test a classifier URL: concurrency sweep and Poisson rates")
    p.add_argument("--url", default="http://127.0.0.1:8000/predict")
    add_config_args(p, VisionLoadConfig)
    p.add_argument("--images", help="folder of images to send (default: the bundled examples)")
    p.add_argument("--api-key", default=None, help="the server's key (default: $ROOFSERVE_API_KEY)")
    p.add_argument("--label", default="manual", help="step name stored in each row")
    p.add_argument("--out", default="results/vision-api.json")
    p.set_defaults(func=cmd_bench_vision_api)

    p = bench.add_parser("llm", help="stream chat requests to an OpenAI-compatible URL: TTFT, TPOT, ITL, tokens/s")
    p.add_argument("--url", default="http://127.0.0.1:8000/v1/chat/completions")
    p.add_argument("--model", default="", help="model name to send (llama.cpp and vLLM servers check it)")
    add_config_args(p, LLMLoadConfig)
    p.add_argument("--api-key", default=None, help="the server's key (default: $ROOFSERVE_API_KEY)")
    p.add_argument("--label", default="manual")
    p.add_argument("--out", default="results/llm-api.json")
    p.set_defaults(func=cmd_bench_llm)

    p = bench.add_parser(
        "llm-serve", help="vLLM's `bench serve` load: a dataset at a request rate, goodput, vLLM's result file",
        description="Send --num-prompts chat requests (synthetic prompts of exact token counts, or a ShareGPT "
        "file with --dataset) to an OpenAI-compatible URL, arriving at --request-rate per second (Poisson, or "
        "burstier with --burstiness below 1), at most --max-concurrency at a time. Prints and saves mean, "
        "std and p50/p90/p99 of TTFT, TPOT, ITL and end-to-end latency (the same keys as all our "
        "load rows: ttft_p99_ms, latency_mean_ms, ...), and the goodput against --goodput targets. "
        "--result-format vllm writes them under vLLM's names instead, in the JSON of `vllm bench serve "
        "--save-result`, so that results from both tools sit side by side.",
    )
    p.add_argument("url", help="e.g. http://127.0.0.1:8001/v1/chat/completions")
    add_config_args(p, LLMServeBenchConfig)
    p.add_argument("--model", default="", help="model name to send (default: the server's own)")
    p.add_argument("--api-key", default=None, help="the server's key (default: $ROOFSERVE_API_KEY)")
    p.add_argument("--label", default="manual")
    p.add_argument("--out", default="results/llm-serve.json")
    p.set_defaults(func=cmd_bench_llm_serve)

    p = bench.add_parser("llm-engine", help="the serving engine in-process: prefill and decode tokens/s, no HTTP")
    p.add_argument("--config", metavar="TOML", help="config file with the server's settings")
    add_config_args(p, LLMConfig)
    add_config_args(p, LLMEngineBenchConfig)
    p.add_argument("--bandwidth-gb-s", type=float, default=None, help="for the roof (from `roofserve peak`)")
    p.add_argument("--label", default="manual")
    p.add_argument("--out", default="results/llm-engine.json")
    p.set_defaults(func=cmd_bench_llm_engine)

    p = bench.add_parser(
        "gguf", help="ours (--gguf-weights packed) against llama.cpp's llama-bench on the same GGUF files, alternated",
        description="Per file and round, as separate processes on --threads cores: `roofserve bench llm-engine "
        "--gguf-weights packed --compile --attention roofserve` (prefill of a --prompt-tokens prompt, then "
        "--max-tokens of decode) and llama.cpp's `llama-bench -p P -n N` (`make llama-server` builds it), with "
        "each process's peak RSS. --shapes x --types add random-weight files of known shapes (written once "
        "into .cache/gguf-random/; K-quant mixes such as Q4_K_M need llama-quantize).",
    )
    p.add_argument("files", nargs="*", help="GGUF files to run")
    p.add_argument("--shapes", type=lambda s: [x for x in s.split(",") if x], default=[],
                   help="random-weight shapes, comma-separated: llama-3.2-1b, llama-3.1-8b, smollm2-135m")
    p.add_argument("--types", type=lambda s: [x for x in s.split(",") if x], default=["Q4_0"],
                   help="their GGUF types, comma-separated: Q4_0, Q8_0, Q4_1, F16, or llama-quantize's Q4_K_M, ... "
                   "(default: Q4_0)")
    p.add_argument("--prompt-tokens", type=int, default=512, help="prefill length (default: 512)")
    p.add_argument("--max-tokens", type=int, default=64, help="decoded tokens (default: 64)")
    p.add_argument("--rounds", type=int, default=2, help="alternations of the two engines (default: 2)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp's threads (default: all cores; "
                   "ours uses torch's, all cores)")
    p.add_argument("--out", default="results/bench-gguf.json", help="JSON rows (default: %(default)s)")
    p.set_defaults(func=cmd_bench_gguf)

    p = bench.add_parser(
        "soak", help="mixed good and bad requests for a while against a server it starts; checks 5xx and memory",
        description="Start a server on 127.0.0.1, send it good and malformed requests round-robin for "
        "--duration-s after a warm-up, and sample the memory of its process tree. Passes (exit 0) when no "
        "good request failed, every bad one got a 4xx, no stalled client (--stalled) was held past the "
        "server's timeout + 5 s, memory grew at most --rss-tolerance after the warm-up, and the server "
        "stopped cleanly on SIGTERM.",
    )
    p.add_argument("server", choices=["vision", "llm"])
    p.add_argument("--duration-s", type=float, default=180.0, help="measured part of the run (default: 180)")
    p.add_argument("--warmup-s", type=float, default=15.0, help="traffic before the memory baseline (default: 15)")
    p.add_argument("--concurrency", type=int, default=4, help="client threads (default: 4)")
    p.add_argument("--server-args", default="",
                   help='flags for `roofserve serve SERVER`, written with =: --server-args="--max-seq-len 512"')
    p.add_argument("--rss-tolerance", type=float, default=0.05, help="allowed memory growth (default: 0.05 = 5%%)")
    p.add_argument("--stalled", type=int, default=100,
                   help="stalled clients held meanwhile (uploads, headers and silent connections that stop; "
                   "reopened when the server closes them; default: 100)")
    p.add_argument("--out", default=None, help="JSON rows (default: results/soak-SERVER.json)")
    p.set_defaults(func=cmd_bench_soak)

    p = bench.add_parser(
        "crowd", help="classification latency with and without a crowd of stalled uploads held open",
        description="Start the vision server on 127.0.0.1 and load it at --concurrency, alternately alone and "
        "while --stalled connections each declare a 100 KB upload and send 10 bytes of it (reopened when the "
        "server closes them). Passes (exit 0) when every request got 200, the median p99 latency with the "
        "crowd is within 2x of the one without, and no stalled connection outlived the server's timeout + 5 s.",
    )
    p.add_argument("--stalled", type=int, default=1000, help="stalled uploads held open (default: 1000)")
    p.add_argument("--concurrency", type=int, default=8, help="classification clients (default: 8)")
    p.add_argument("--requests", type=int, default=400, help="requests per run (default: 400)")
    p.add_argument("--rounds", type=int, default=2, help="pairs of runs, alone then crowded (default: 2)")
    p.add_argument("--server-args", default="", help='flags for `roofserve serve vision`, written with =')
    p.add_argument("--out", default="results/crowd-vision.json", help="JSON rows (default: %(default)s)")
    p.set_defaults(func=cmd_bench_crowd)

    p = bench.add_parser(
        "fleet", help="rolling restart of vision replicas behind haproxy under load: no request may fail",
        description="Start --replicas vision servers on 127.0.0.1 behind haproxy (health checks on /health), "
        "load them through it, and restart each in turn (SIGTERM, start again, wait until haproxy has it back). "
        "Passes (exit 0) when every request got a 2xx. Needs haproxy (apt-get install haproxy).",
    )
    p.add_argument("--replicas", type=int, default=2, help="servers behind the balancer (default: 2)")
    p.add_argument("--concurrency", type=int, default=8, help="clients through the balancer (default: 8)")
    p.add_argument("--images", help="folder of images to send (default: the bundled examples)")
    p.add_argument("--server-args", default="", help='flags for `roofserve serve vision`, written with =')
    p.add_argument("--out", default="results/fleet-vision.json", help="JSON rows (default: %(default)s)")
    p.set_defaults(func=cmd_bench_fleet)

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
    p.add_argument("--concurrency", type=_ints, default=None, help="override concurrency levels")
    p.add_argument("--out", default="results/llm-sweep.json")
    p.add_argument("--report", default=None, metavar="DIR", help="also write the Markdown report into DIR")
    p.set_defaults(func=cmd_sweep_llm)

    p = sub.add_parser("dataset", help="write synthetic chat requests as a ShareGPT-format JSON file",
                       description="Prompts of exact token counts (message content) drawn from common words, "
                       "lengths fixed or drawn from a uniform or normal distribution; readable by `roofserve bench "
                       "llm-serve --dataset` and by vLLM's sharegpt dataset.")
    add_config_args(p, LLMDatasetConfig)
    p.add_argument("--out", default="results/dataset.json")
    p.set_defaults(func=cmd_dataset)

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
    from roofserve.server.env import LOG_FORMAT

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format=LOG_FORMAT)
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.verbose else logging.WARNING)  # a line per request
    from roofserve.config import inductor_cache

    inductor_cache()  # before anything asks inductor for its cache folder; every process started from here inherits it
    try:
        if args.command in ("bench", "sweep", "demo", "peak"):
            from roofserve.server.env import reexec_with, tuned_environ

            reexec_with(tuned_environ("glibc-tuned"))  # the same malloc the servers use
        return args.func(args)
    except UserError as e:
        print(f"roofserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
