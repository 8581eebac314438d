"""The OpenAI-compatible API: POST /v1/chat/completions and /v1/completions (streaming and not);
POST /tokenize and /detokenize, GET /v1/models and /version are added by llm.serve.

The HTTP process validates the request (llm.protocol). A worker admits requests to its engine (`admit`) and
advances them (`step`): many in a continuous batch, driven by server.lit.StepLoop, or one at a time
(max_batch_size 1, as the reference deployment served), driven by LitServe's streaming loop through
`predict`. Text items travel back and are sent as SSE or gathered.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import litserve as ls
from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse

from roofserve.config import LLMConfig
from roofserve.llm.protocol import Formatter, parse_body, validate_chat_request, validate_completion_request
from roofserve.llm.text import Coalescer, TextStream
from roofserve.server.app import worker_threads
from roofserve.server.env import worker_logging
from roofserve.server.http import FAILED_MID_ANSWER, Rejection, error_response
from roofserve.server.lit import StepLoop

log = logging.getLogger(__name__)
_CANCEL_SLOTS = 64


@dataclass
class _Job:
    """A request in the batch (worker side): its text pipeline and the limits it runs under."""

    request_id: int
    deadline: float
    text: TextStream
    joiner: Coalescer


class LLMAPI(ls.LitAPI):
    extra_paths = ("/v1/completions",)  # served by the same handler and workers (server.lit registers them)

    def __init__(self, cfg: LLMConfig, model_id: str, random_weights: bool):
        super().__init__(max_batch_size=1, stream=True, api_path="/v1/chat/completions")
        self.cfg = cfg
        self.model_id = model_id
        self.served = tuple(cfg.served_model_name) or (model_id,)  # the names a request's `model` may use
        self.random_weights = random_weights
        # Request ids whose client went away; the worker checks them between tokens.
        self.cancelled = mp.get_context("spawn").Array("q", _CANCEL_SLOTS, lock=False)
        # Written by the workers: generations stopped because their client left, and the tokens they had made.
        self.stopped = mp.get_context("spawn").Array("q", 2)
        # Per worker: requests running, waiting, then decode steps per batch size (0..max_batch_size).
        self.batch_stats = [mp.get_context("spawn").Array("q", 3 + cfg.max_batch_size, lock=False)
                            for _ in range(cfg.workers_per_device)]
        if cfg.max_batch_size > 1:
            self.loop = StepLoop()
        self._cancel_next = 0

    # --- HTTP process ---------------------------------------------------------------------
    async def read_payload(self, request: Request, body: bytes) -> dict:
        if request.headers.get("content-type", "").split(";")[0].strip().lower() not in ("application/json", ""):
            raise HTTPException(415, "send the request as application/json")
        doc = parse_body(body)
        if request.url.path == "/v1/completions":
            return validate_completion_request(doc, self.cfg, self.served)
        return validate_chat_request(doc, self.cfg, self.served)

    def cancel(self, request_id: int) -> None:
        self.cancelled[self._cancel_next % _CANCEL_SLOTS] = request_id
        self._cancel_next += 1

    def metrics_lines(self) -> list[str]:
        stopped, tokens = self.stopped[:]
        rows = [row[:] for row in self.batch_stats]
        steps = [sum(r[2 + b] for r in rows) for b in range(1, self.cfg.max_batch_size + 1)]
        return ["# TYPE roofserve_generations_stopped_total counter",
                f"roofserve_generations_stopped_total {stopped}",
                "# TYPE roofserve_stopped_generation_tokens_total counter",
                f"roofserve_stopped_generation_tokens_total {tokens}",
                "# HELP roofserve_requests_running sequences in the decode batch (with --max-batch-size > 1)",
                "# TYPE roofserve_requests_running gauge",
                f"roofserve_requests_running {sum(r[0] for r in rows)}",
                "# HELP roofserve_requests_waiting sequences admitted, waiting for a batch slot",
                "# TYPE roofserve_requests_waiting gauge",
                f"roofserve_requests_waiting {sum(r[1] for r in rows)}",
                "# HELP roofserve_decode_steps_total decode steps by the number of sequences in them",
                "# TYPE roofserve_decode_steps_total counter",
                *(f'roofserve_decode_steps_total{{batch_size="{b}"}} {n}' for b, n in enumerate(steps, 1))]

    async def respond(self, payload: dict, first: dict, items: AsyncIterator, close: Callable[[], None],
                      started: float, metrics) -> object:
        extra = {"roofserve": {"random_weights": True, "note": "random weights: this text is meaningless"}} if self.random_weights else {}
        out = Formatter(payload, self.served[0], int(time.time()), extra)
        out.prompt_tokens = first.get("prompt_tokens", 0)
        metrics.prompt_tokens += out.prompt_tokens

        if not payload["stream"]:
            parts, end, scored, finished = [], None, [], False
            try:
                async for item, _status in items:
                    if isinstance(item, Rejection):
                        finished = True  # the worker ended it: nothing left to cancel
                        return error_response(item.status, item.message)
                    if item["t"] == "delta":
                        if not parts:
                            metrics.ttft.observe(time.perf_counter() - started)
                        parts.append(item["text"])
                        scored += item.get("logprobs", ())
                    elif item["t"] == "end":
                        end = item
                        metrics.tokens_generated += item["usage"]["completion_tokens"]
                finished = True
            finally:
                if not finished:  # the client went away (the handler was cancelled): stop generating
                    self.cancel(payload["request_id"])
                close()
            if end is None:  # the items ended with no end item: the worker failed without saying so
                return error_response(FAILED_MID_ANSWER.status, FAILED_MID_ANSWER.message)
            return JSONResponse(out.whole("".join(parts), end["finish_reason"], end["usage"], scored))

        async def events():
            finished, first_token = False, None
            try:
                for event in out.start():
                    yield event
                async for item, _status in items:
                    if isinstance(item, Rejection):
                        yield out.error(item.status, item.message)
                        break
                    if item["t"] == "delta":
                        now = time.perf_counter()
                        if first_token is None:
                            metrics.ttft.observe(now - started)
                            first_token = now
                        yield out.delta(item["text"], item.get("logprobs"), item.get("tokens", 0))
                    elif item["t"] == "end":
                        tokens = item["usage"]["completion_tokens"]
                        metrics.tokens_generated += tokens
                        if first_token is not None and tokens > 1:
                            metrics.tpot.observe((time.perf_counter() - first_token) / (tokens - 1))
                        for event in out.end(item["finish_reason"], item["usage"]):
                            yield event
                        break
                else:  # the items ended with no end item: the worker failed without saying so
                    yield out.error(FAILED_MID_ANSWER.status, FAILED_MID_ANSWER.message)
                yield "data: [DONE]\n\n"
                finished = True
            finally:
                if not finished:  # the client went away: stop generating
                    self.cancel(payload["request_id"])
                close()

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # --- worker process -------------------------------------------------------------------
    def setup(self, device: str) -> None:
        import torch  # here, in the worker: the HTTP process never imports torch

        from roofserve.llm.runtime import build_generator

        worker_logging()
        torch.set_num_threads(worker_threads(self.cfg))
        self.generator = build_generator(self.cfg, device)
        self.jobs: dict[str, _Job] = {}
        self._stats_row = int(os.environ.get("LITSERVE_WORKER_ID", "0")) % len(self.batch_stats)

    def decode_request(self, request: dict) -> dict:
        return request

    def _prompt(self, request: dict) -> tuple[list[int], int, Rejection | None]:
        """(prompt ids, max_tokens, or the 400 when they do not fit the context)."""
        if request["route"] == "chat":
            ids = self.generator.prompt_ids(request["messages"])
        elif isinstance(request["prompt"], str):
            ids = self.generator.text_ids(request["prompt"])
        else:
            ids = request["prompt"]
            if max(ids) >= self.generator.vocab_size:
                return ids, 0, Rejection(400, f"token ids must be in [0, {self.generator.vocab_size})")
        room = self.cfg.max_seq_len - len(ids)
        max_tokens = request["max_tokens"] or min(self.cfg.default_max_tokens, room)
        if len(ids) + max_tokens > self.cfg.max_seq_len or room < 1:
            return ids, max_tokens, Rejection(400, f"prompt has {len(ids)} tokens and max_tokens is {max_tokens}: "
                                              f"{len(ids) + max_tokens} is over the context of "
                                              f"{self.cfg.max_seq_len} tokens")
        return ids, max_tokens, None

    def _count_stopped(self, tokens: int) -> None:
        with self.stopped.get_lock():
            self.stopped[0] += 1
            self.stopped[1] += tokens

    def predict(self, request: dict):
        """One request at a time (max_batch_size 1: LitServe's streaming loop, or a Ray replica's thread):
        admit it, then step until it is done, as StepLoop does for many (the deadline, a client that left,
        stop strings: all in `step`)."""
        uid = f"one-{request['request_id']}"
        try:
            for item in self.admit(uid, request):
                if item is None:
                    return
                yield item
            while True:
                for seq_uid, item in self.step():
                    if seq_uid == uid:
                        if item is None:
                            return
                        yield item
        finally:  # ended early (an error, or LitServe dropped the generator): nothing of it stays behind
            if self.jobs.pop(uid, None) is not None:
                self.generator.batch.cancel(uid)

    # --- worker process: server.lit.StepLoop drives these for many requests at once, `predict` for one --
    def admit(self, uid: str, request: dict) -> list:
        ids, max_tokens, rejection = self._prompt(request)
        if rejection:
            return [rejection, None]
        from roofserve.llm.sampling import Sampling, logprob_hook  # torch: the worker's

        gen = self.generator
        scores, observe = logprob_hook(request["logprobs"])
        sampling = Sampling(max_tokens, request["temperature"], request["top_p"], request["seed"], observe,
                            **{key: request[key] for key in ("top_k", "min_p", "presence_penalty", "frequency_penalty",
                                                             "repetition_penalty")})
        gen.batch.add(uid, ids, sampling, set() if request["ignore_eos"] else gen.stop_ids)
        self.jobs[uid] = _Job(request["request_id"], request.get("deadline", float("inf")),
                              TextStream(gen.decode, request["stop"], max_tokens, len(ids), scores),
                              Coalescer(self.cfg.stream_interval))
        return [{"t": "start", "prompt_tokens": len(ids)}]

    def busy(self) -> bool:
        return bool(self.jobs)

    def step(self) -> list[tuple[str, object]]:
        """Drop the requests whose client left or whose deadline passed, advance the batch one step, and
        turn its tokens into each request's text items (stop strings end only their own sequence)."""
        out: list[tuple[str, object]] = []
        batch, now, cancelled = self.generator.batch, time.time(), set(self.cancelled[:])
        for uid, job in list(self.jobs.items()):
            if job.request_id in cancelled or now > job.deadline:
                batch.cancel(uid)
                del self.jobs[uid]
                if job.request_id in cancelled:
                    self._count_stopped(len(job.text.ids))
                else:
                    out.append((uid, Rejection(504, f"generation passed the deadline of {self.cfg.timeout_s:g} s")))
                out.append((uid, None))
        if batch.has_work():
            for uid, token in batch.step():
                job = self.jobs.get(uid)
                if job is None:
                    continue
                if token is not None:
                    out += [(uid, item) for delta in job.text.push(token) for item in job.joiner.push(delta)]
                    if not job.text.stopped:
                        continue
                    batch.cancel(uid)  # a stop string: this sequence ends, the others go on
                out += [(uid, item) for end in job.text.close() for item in job.joiner.push(end)]
                out.append((uid, None))
                del self.jobs[uid]
        self._record_batch(batch)
        return out

    def _record_batch(self, batch) -> None:
        row = self.batch_stats[self._stats_row]
        row[0], row[1] = len(batch.running), len(batch.waiting)
        if batch.last_batch_size:
            row[2 + batch.last_batch_size] += 1

    def encode_response(self, outputs):
        yield from outputs

    def format_encoded_response(self, data):
        return data  # dicts and Rejections travel as they are
