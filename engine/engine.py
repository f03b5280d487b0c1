"""vLLM inside the trainer's process, driven from asyncio.

Why an asyncio driver over the in-process `LLM` rather than `AsyncLLM`: on this vLLM build
`AsyncLLM` always runs its engine core in a child process, so a weight update has to cross a
process boundary (tensors do not survive the RPC; they must be written to /dev/shm as safetensors
and read back). With `VLLM_ENABLE_V1_MULTIPROCESSING=0` the model runner lives in our process:
the trainer's tensors are handed to `reload_weights` directly, no serialisation, and sleep/wake
are plain calls. Throughput was measured equal (~465 tok/s both ways on SmolLM2-135M, 2 CPU cores).

The engine has no locks, so exactly one thread (the engine thread) ever touches it: it drains a
command queue (add/abort requests, weight pushes, sleep/wake), calls `step()` while requests are
unfinished, and hands each request's new tokens back to the event loop with
`loop.call_soon_threadsafe`. Many concurrent requests are therefore batched continuously by vLLM's
scheduler, exactly as in the server deployment.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger("engine")

# Must be set before vLLM (and torch) are imported anywhere in the process: in-process engine, and
# every core for torch. Without OMP_NUM_THREADS vLLM's CPU worker drops torch to one thread "for
# serving", which would also halve the colocated trainer's speed.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))


@dataclass
class EngineConfig:
    model: str                           # HF folder or hub name (already resolved)
    max_model_len: int = 2048
    dtype: str = "auto"                  # "auto": float32 on CPU (exact logprobs), bfloat16 on GPU
    seed: int = 0
    max_num_seqs: int = 64
    gpu_memory_utilization: float = 0.5  # GPU: leave room for the colocated trainer
    cpu_kv_cache_gib: int = 2            # CPU: VLLM_CPU_KVCACHE_SPACE (whole GiB)
    enforce_eager: bool = True


@dataclass
class SamplingOptions:
    temperature: float = 1.0
    max_tokens: int = 256
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)


@dataclass
class Delta:
    """New tokens of one request since the last delta."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: Literal["stop", "length"] | None = None


@dataclass
class Generation:
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]   # of each sampled token, at the sampling temperature
    text: str
    finish_reason: Literal["stop", "length"]
    temperature: float


class EngineDead(RuntimeError):
    pass


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


class Engine:
    """Async front of one in-process vLLM engine.

        engine = Engine(EngineConfig(model="/path/to/hf-folder"))
        await engine.start()
        gen = await engine.generate(prompt_ids, SamplingOptions(temperature=0.7, max_tokens=64))
        await engine.update_weights(trainer.named_weights())
    """

    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        self._cmds: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._said_no_sleep = False
        self.tokenizer: Any = None
        self.weight_shapes: dict[str, tuple[int, ...]] = {}
        self.asleep = False
        self.weight_version = 0

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> "Engine":
        loop = asyncio.get_running_loop()
        ready: asyncio.Future = loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(loop, ready), name="vllm-engine", daemon=True)
        self._thread.start()
        await ready
        return self

    def _make_llm(self) -> Any:
        gpu = on_gpu()
        if not gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.cfg.cpu_kv_cache_gib))
        from vllm import LLM

        dtype = self.cfg.dtype if self.cfg.dtype != "auto" else ("bfloat16" if gpu else "float32")
        return LLM(
            model=self.cfg.model,
            dtype=dtype,
            seed=self.cfg.seed,
            max_model_len=self.cfg.max_model_len,
            max_num_seqs=self.cfg.max_num_seqs,
            enforce_eager=self.cfg.enforce_eager,
            # logprobs of log_softmax(logits / T): what the trainer computes (raw would ignore T)
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=True,
            **({"enable_sleep_mode": True, "gpu_memory_utilization": self.cfg.gpu_memory_utilization} if gpu else {}),
        )

    def _run(self, loop: asyncio.AbstractEventLoop, ready: asyncio.Future) -> None:
        try:
            self._llm = self._make_llm()
            self.tokenizer = self._llm.get_tokenizer()
            self.weight_shapes = _checkpoint_shapes(self.cfg.model)
        except BaseException as e:  # report start failures to the awaiting coroutine
            loop.call_soon_threadsafe(_settle, ready, e, None)
            return
        loop.call_soon_threadsafe(_settle, ready, None, self)
        try:
            self._serve()
        except BaseException as e:
            self._error = e
            log.exception("engine thread died")
            for rid in list(self._streams):
                self._push(rid, e)

    def _serve(self) -> None:
        engine = self._llm.llm_engine
        while True:
            busy = engine.has_unfinished_requests()
            try:
                cmd = self._cmds.get(block=not busy)
            except queue.Empty:
                cmd = None
            while cmd is not None:
                if cmd[0] == "stop":
                    return
                self._execute(*cmd)
                try:
                    cmd = self._cmds.get_nowait()
                except queue.Empty:
                    cmd = None
            if engine.has_unfinished_requests():
                for out in engine.step():
                    self._deliver(out)

    def _execute(self, kind: str, payload: Any) -> None:
        if kind == "add":
            rid, prompt_ids, params = payload
            try:
                self._llm.llm_engine.add_request(rid, {"prompt_token_ids": prompt_ids}, params)
            except Exception as e:
                self._push(rid, e)
            return
        if kind == "abort":
            self._llm.llm_engine.abort_request([payload])
            return
        fn, fut, loop = payload  # "call": run fn(llm) on this thread, settle fut on its loop
        try:
            result, err = fn(self._llm), None
        except Exception as e:
            result, err = None, e
        loop.call_soon_threadsafe(_settle, fut, err, result)

    def _deliver(self, out: Any) -> None:
        comp = out.outputs[0]
        ids = list(comp.token_ids)
        lps = [_logprob_of(entry, tid) for entry, tid in zip(comp.logprobs or [], ids)]
        finish = None
        if out.finished:
            finish = "length" if comp.finish_reason == "length" else "stop"
        self._push(out.request_id, Delta(ids, lps, comp.text, finish))

    def _push(self, rid: str, item: Delta | BaseException) -> None:
        entry = self._streams.get(rid)
        if entry is None:
            return
        loop, q = entry
        if isinstance(item, BaseException) or item.finish_reason is not None:
            self._streams.pop(rid, None)
        loop.call_soon_threadsafe(q.put_nowait, item)

    async def _call(self, fn: Callable[[Any], Any]) -> Any:
        self.check_alive()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._cmds.put(("call", (fn, fut, loop)))
        return await fut

    def check_alive(self) -> None:
        if self._error is not None:
            raise EngineDead(f"engine thread died: {self._error!r}")
        if self._thread is None or not self._thread.is_alive():
            raise EngineDead("engine is not running")

    async def shutdown(self) -> None:
        if self._thread and self._thread.is_alive():
            self._cmds.put(("stop", None))
            await asyncio.to_thread(self._thread.join, 30)

    # ---- generation -----------------------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self.cfg.max_model_len

    def _params(self, opts: SamplingOptions) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            temperature=opts.temperature,
            max_tokens=opts.max_tokens,
            seed=opts.seed,
            stop=opts.stop or None,
            stop_token_ids=opts.stop_token_ids or None,
            logprobs=0,  # the sampled token's own logprob
            output_kind=RequestOutputKind.DELTA,
            # top-k / top-p / min-p stay off: they would make the sampling distribution differ
            # from the one the trainer's logprobs describe
        )

    async def stream(self, prompt_ids: list[int], opts: SamplingOptions) -> AsyncIterator[Delta]:
        """Yield the request's new tokens as the engine produces them; aborts if abandoned."""
        self.check_alive()
        if self.asleep:
            raise EngineDead("engine is asleep; wake() it before generating")
        rid = f"req-{next(self._ids)}"
        q: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = (asyncio.get_running_loop(), q)
        self._cmds.put(("add", (rid, list(prompt_ids), self._params(opts))))
        done = False
        try:
            while not done:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                done = item.finish_reason is not None
                yield item
        finally:
            if not done:
                self._streams.pop(rid, None)
                self._cmds.put(("abort", rid))

    async def generate(self, prompt_ids: list[int], opts: SamplingOptions) -> Generation:
        ids: list[int] = []
        lps: list[float] = []
        text: list[str] = []
        finish = "stop"
        async for d in self.stream(prompt_ids, opts):
            ids += d.token_ids
            lps += d.logprobs
            text.append(d.text)
            finish = d.finish_reason or finish
        return Generation(list(prompt_ids), ids, lps, "".join(text), finish, opts.temperature)

    # ---- training-side controls -----------------------------------------------------------------
    async def sleep(self) -> None:
        """Free accelerator memory for training (vLLM sleep level 1: weights offloaded, KV dropped)."""
        if not on_gpu():
            self._say_no_sleep()
            return
        await self._call(lambda llm: llm.sleep(level=1))
        self.asleep = True

    async def wake(self) -> None:
        if not on_gpu():
            self._say_no_sleep()
            return
        await self._call(lambda llm: llm.wake_up())
        self.asleep = False

    def _say_no_sleep(self) -> None:
        if not self._said_no_sleep:
            log.info("sleep/wake: no accelerator, so nothing to free; sleep() and wake() are no-ops on CPU")
            self._said_no_sleep = True

    async def update_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> float:
        """Load new weights into the running engine, then drop the prefix cache. Returns seconds.

        Names and shapes are checked first: a failed reload leaves parameters on the meta device
        and the next forward would kill the engine.
        """
        tensors = [(n, t.detach()) for n, t in named_tensors]
        check_weights(tensors, self.weight_shapes)
        t0 = time.perf_counter()

        def push(llm: Any) -> None:
            llm.collective_rpc(_reload_weights, args=(tensors,))
            llm.reset_prefix_cache()

        await self._call(push)
        self.weight_version += 1
        return time.perf_counter() - t0


def _reload_weights(worker: Any, tensors: list[tuple[str, Any]]) -> bool:
    # `model.load_weights` fails on CPU (the backend repacks linear weights after loading);
    # reload_weights re-runs that processing.
    worker.model_runner.reload_weights(weights_iterator=iter(tensors))
    # With tied embeddings no tensor names the LM head, so the layerwise reload puts the head's
    # OLD tensors back (vLLM logs "ParallelLMHead: Failed to load weights"): the engine would
    # sample from new layers and a stale head. Re-tie it to the freshly loaded embedding and
    # redo the head's post-load processing (on CPU that packs the GEMM weight it really uses).
    model = worker.model_runner.get_model()
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False) and hasattr(model, "lm_head"):
        head = model.lm_head
        head.weight = model.model.embed_tokens.weight
        head.quant_method.process_weights_after_loading(head)
    return True


def check_weights(tensors: list[tuple[str, Any]], expected: dict[str, tuple[int, ...]]) -> None:
    if not expected:
        return
    for name, t in tensors:
        if name not in expected:
            raise ValueError(f"weight {name!r} is not a parameter of the served model")
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"weight {name!r} has shape {tuple(t.shape)}, the served model has {expected[name]}")


def _checkpoint_shapes(model: str) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes from the checkpoint's safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    folder = Path(model)
    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                shapes[name] = tuple(st.get_slice(name).get_shape())
    return shapes


def _logprob_of(entry: Any, token_id: int) -> float:
    lp = entry[token_id]
    return float(getattr(lp, "logprob", lp))


def _settle(fut: asyncio.Future, err: BaseException | None, result: Any) -> None:
    if fut.done():
        return
    if err is not None:
        fut.set_exception(err)
    else:
        fut.set_result(result)
