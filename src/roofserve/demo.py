"""`roofserve demo`: the main job on the embedded default models, end to end, as a newcomer runs it."""

from __future__ import annotations

import json
import urllib.request

from roofserve.config import LLMLoadConfig, make_config
from roofserve.examples import example_images
from roofserve.load.llm import bench_llm_api
from roofserve.load.process import running_server


def _post_json(url: str, body: bytes, content_type: str, timeout_s: float) -> dict:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


def demo(ladder: str, requests: int, concurrency: list[int], out: str) -> None:
    """Serve the default classifier and classify the example photos over HTTP, run the vision ladder and
    write its report, then serve the chat model, ask it a question and time a few streamed answers."""
    from roofserve.report.markdown import build_report
    from roofserve.results import run_meta, write_results
    from roofserve.sweep.vision import sweep_vision

    print("1/4 starting the vision server on 127.0.0.1 with the default EfficientNet-Lite0 ...")
    with running_server(["vision"]) as url:
        for name, data in example_images():
            ctype = "image/png" if name.endswith(".png") else "image/jpeg"
            answer = _post_json(url + "/predict", data, ctype, 60)
            breed = f", breed {answer['breeds'][0]['breed']}" if answer["animal"] == "dog" else ""
            print(f"    {name:24s} -> {answer['animal']} ({answer['confidence']:.2f}){breed}; "
                  f"top class {answer['top_classes'][0]['label']}")
    print(f"2/4 running the optimization ladder {ladder} (a few minutes) ...")
    found, rows = sweep_vision(ladder, {"requests": requests, "concurrency": concurrency})
    results = write_results(f"{out}/vision-sweep.json", run_meta("sweep vision", {"ladder": ladder, "doc": found.doc}),
                            rows)
    print(f"    results: {results}")
    print(f"    report: {build_report([str(results)], f'{out}/report')}")
    print("3/4 starting the chat server (SmolLM2-135M-Instruct, OpenAI-compatible) and asking it ...")
    with running_server(["llm", "--max-seq-len", "512"]) as url:
        body = json.dumps({"messages": [{"role": "user", "content": "What is the capital of France?"}],
                           "max_tokens": 32, "temperature": 0}).encode()
        answer = _post_json(url + "/v1/chat/completions", body, "application/json", 120)
        print(f"    Q: What is the capital of France?  A: {answer['choices'][0]['message']['content']!r}")
        load = make_config(LLMLoadConfig, {"max_tokens": 64, "runs": 3})
        row, _ = bench_llm_api(url + "/v1/chat/completions", load, progress=False)
        print(f"    streaming, 64 tokens: {row['decode_tokens_per_s']} tok/s decode, TTFT p50 {row['ttft_p50_ms']:.0f} ms "
              "(bf16 eager; `make bench-llm` runs the whole LLM ladder)")
    print(f"4/4 done: results in {out}/, report in {out}/report/report.md")
