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

from engine import cpu_sleep
from engine.cpu_sleep import KV_CACHE, WEIGHTS
from engine.tp import Mirror, remove_stale_cpu_shm, step_digest

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
    cpu_kv_cache_gib: float = 2.0        # CPU: the KV cache's size (vLLM's kv_cache_memory_bytes)
    enforce_eager: bool | None = None    # None: eager on CPU (required), CUDA graphs + compile on GPU
    max_num_batched_tokens: int | None = None   # None: vLLM's default for the platform
    max_lora_rank: int | None = None     # set: serve LoRA adapters of up to this rank (load_adapter)
    external_launcher: bool = False      # one engine per torchrun rank, on the ranks' process group
    tensor_parallel_size: int = 1        # with external_launcher: ranks sharing one model (engine/tp.py)


@dataclass
class SamplingOptions:
    temperature: float = 1.0
    max_tokens: int = 256
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False


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


@dataclass
class VLLMState:
    """What vLLM itself reports, read on the engine thread."""

    sleeping: bool               # any memory pool asleep or the scheduler paused
    unfinished_requests: bool    # requests vLLM still holds (must be False after a sleep)


class EngineDead(RuntimeError):
    pass


class InvalidRequest(ValueError):
    """vLLM refused the request's parameters or prompt: the caller's fault, not the engine's."""


class EngineAsleep(RuntimeError):
    """A generation was asked for (or was in flight) while the engine sleeps for training."""


# vLLM's sleep-mode memory pools. Level 1 offloads "weights" to host memory and drops "kv_cache";
# level 2 drops both, and only a weight push brings the weights back.
SLEEP_TAGS = (WEIGHTS, KV_CACHE)
KEEP_WEIGHTS, DISCARD_WEIGHTS = 1, 2  # sleep levels


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

    def __init__(self, cfg: EngineConfig, mirror: Mirror | None = None) -> None:
        self.cfg = cfg
        self.mirror = mirror  # a tensor-parallel group's channel (engine/tp.py); None: the engine is alone
        self._mirrored: set[str] = set()  # a group member's requests in flight (it has no streams)
        self._digest = 0  # of the last step's sampled tokens (engine/tp.step_digest)
        self._cmds: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.tokenizer: Any = None
        self.weight_shapes: dict[str, tuple[int, ...]] = {}
        self.weight_version = 0
        self.max_token_id = 0  # the largest id vLLM accepts in a prompt (model or tokenizer vocab)
        # The GPU lifecycle, per vLLM memory pool: which pools sleep now. Only the engine thread's
        # commands change it; the same transitions run on CPU, where vLLM pauses its scheduler and
        # tracks the sleeping tags, and engine/cpu_sleep.py frees the memory vLLM's worker does not.
        self.asleep_tags: set[str] = set()
        self.weights_discarded = False  # by a level-2 sleep, until the next weight push
        # Every lifecycle call that reached vLLM, in order ("sleep:2", "wake_up:weights", "reload_weights",
        # "reset_prefix_cache", ...): the order is the contract that makes a weight push land.
        self.lifecycle: list[str] = []
        self.aborted_at_sleep = 0
        self.adapter: Any = None  # vLLM's LoRARequest every generation runs with (load_adapter), or None
        self.generations = 0      # requests handed to vLLM since start

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
            # vLLM's legacy variable (whole GiB) would override the size given below
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        from vllm import LLM

        dtype = self.cfg.dtype if self.cfg.dtype != "auto" else ("bfloat16" if gpu else "float32")
        eager = self.cfg.enforce_eager if self.cfg.enforce_eager is not None else not gpu
        extra: dict[str, Any] = {}
        if self.cfg.max_num_batched_tokens is not None:
            extra["max_num_batched_tokens"] = self.cfg.max_num_batched_tokens
        if self.cfg.external_launcher:
            # each rank's engine (or each group's: tensor_parallel_size > 1) on the process group the
            # trainer's ranks already joined (grpo/ranks.py), on the rank's own device
            extra.update(distributed_executor_backend="external_launcher",
                         tensor_parallel_size=self.cfg.tensor_parallel_size)
            if self.mirror is not None and not gpu:
                stale = remove_stale_cpu_shm(self.mirror.ranks, self.mirror.rank)
                if stale:
                    log.warning("removed shared memory an earlier run left: %s", ", ".join(stale))
        if self.cfg.max_lora_rank is not None:
            # one adapter at a time: a push replaces it while no request runs (the engine sleeps)
            extra.update(enable_lora=True, max_lora_rank=self.cfg.max_lora_rank, max_loras=1, max_cpu_loras=1)
        if gpu:
            extra.update(enable_sleep_mode=True, gpu_memory_utilization=self.cfg.gpu_memory_utilization)
        else:
            extra["kv_cache_memory_bytes"] = int(self.cfg.cpu_kv_cache_gib * 2**30)
        return LLM(
            model=self.cfg.model,
            dtype=dtype,
            seed=self.cfg.seed,
            max_model_len=self.cfg.max_model_len,
            max_num_seqs=self.cfg.max_num_seqs,
            enforce_eager=eager,
            # logprobs of log_softmax(logits / T): what the trainer computes (raw would ignore T)
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=True,
            **extra,
        )

    def _run(self, loop: asyncio.AbstractEventLoop, ready: asyncio.Future) -> None:
        try:
            self._llm = self._make_llm()
            self.tokenizer = self._llm.get_tokenizer()
            self.weight_shapes = _checkpoint_shapes(self.cfg.model)
            self.max_token_id = max(len(self.tokenizer), self._llm.llm_engine.model_config.get_vocab_size()) - 1
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
            while not self._cmds.empty():  # calls waiting for this thread would wait forever
                kind, payload = self._cmds.get_nowait()
                if kind == "call":
                    fn, fut, loop, _ = payload
                    loop.call_soon_threadsafe(_settle, fut, EngineDead(f"engine thread died: {e!r}"), None)

    def _serve(self) -> None:
        if self.mirror is not None and not self.mirror.leader:
            return self._follow_leader()
        engine = self._llm.llm_engine
        while True:
            busy = engine.has_unfinished_requests()
            try:
                cmds = [self._cmds.get(block=not busy)]
            except queue.Empty:
                cmds = []
            while True:
                try:
                    cmds.append(self._cmds.get_nowait())
                except queue.Empty:
                    break
            if self.mirror is not None:  # the group's other members do the same, in this order
                self.mirror.send([_described(c) for c in cmds if c[0] != "call" or c[1][3]], self._digest)
            for cmd in cmds:
                if cmd[0] == "stop":
                    return
                self._execute(*cmd)
            if engine.has_unfinished_requests():
                outs = engine.step()
                self._digest = step_digest(outs)
                for out in outs:
                    self._deliver(out)

    def _follow_leader(self) -> None:
        """A tensor-parallel member's engine thread: the leader's requests and aborts as sent, its
        lifecycle calls matched to this rank's own (its conductor makes the same ones), its steps."""
        engine = self._llm.llm_engine
        while True:
            cmds, digest = self.mirror.receive()  # type: ignore[union-attr]
            if digest != self._digest:
                raise RuntimeError(f"tensor-parallel ranks {self.mirror.ranks} sampled different tokens "  # type: ignore[union-attr]
                                   "(their engines diverged): stopping")
            for kind, payload in cmds:
                if kind == "stop":
                    return
                if kind == "call":
                    self._execute(*self._own_call(payload))
                    continue
                if kind == "add":
                    self._mirrored.add(payload[0])
                elif kind == "abort":
                    self._mirrored.discard(payload)
                self._execute(kind, payload)
            if engine.has_unfinished_requests():
                outs = engine.step()
                self._digest = step_digest(outs)
                self._mirrored -= {out.request_id for out in outs if out.finished}

    def _own_call(self, name: str) -> tuple[str, Any]:
        while True:
            cmd = self._cmds.get()
            if cmd[0] == "call" and cmd[1][3] == name:
                return cmd
            if cmd[0] == "stop":
                raise EngineDead(f"stopped while the group's leader ran {name!r}")
            if cmd[0] == "call":  # a call the leader did not make (a state query): answer it here
                self._execute(*cmd)

    def _execute(self, kind: str, payload: Any) -> None:
        if kind == "add":
            rid, prompt_ids, params = payload
            if self.asleep_tags:  # queued before a sleep that ran first: vLLM would hold it forever
                self._push(rid, EngineAsleep("the engine went to sleep for a training step; retry after it"))
                return
            try:
                self._llm.llm_engine.add_request(rid, {"prompt_token_ids": prompt_ids}, params,
                                                 lora_request=self.adapter)
            except _client_errors() as e:  # vLLM's validation (token ids, lengths, parameters)
                self._push(rid, InvalidRequest(str(e)))
            except Exception as e:
                self._push(rid, e)
            return
        if kind == "abort":
            self._llm.llm_engine.abort_request([payload])
            return
        fn, fut, loop, _ = payload  # "call": run fn(llm) on this thread, settle fut on its loop
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

    async def _call(self, fn: Callable[[Any], Any], mirrored: str | None = None) -> Any:
        """Run fn(llm) on the engine thread. `mirrored` names a call every member of a tensor-parallel
        group makes at the same point (it touches the model); None: this engine's alone (a query)."""
        self.check_alive()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._cmds.put(("call", (fn, fut, loop, mirrored)))
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

    def sampling_params(self, opts: SamplingOptions) -> Any:
        """vLLM's sampling parameters; InvalidRequest when vLLM refuses them."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        try:
            return SamplingParams(
                temperature=opts.temperature,
                max_tokens=opts.max_tokens,
                seed=opts.seed,
                stop=opts.stop or None,
                stop_token_ids=opts.stop_token_ids or None,
                ignore_eos=opts.ignore_eos,
                logprobs=0,  # the sampled token's own logprob
                output_kind=RequestOutputKind.DELTA,
                # top-k / top-p / min-p stay off: they would make the sampling distribution differ
                # from the one the trainer's logprobs describe
            )
        except _client_errors() as e:
            raise InvalidRequest(str(e)) from None

    async def stream(self, prompt_ids: list[int], opts: SamplingOptions) -> AsyncIterator[Delta]:
        """Yield the request's new tokens as the engine produces them; aborts if abandoned."""
        self.check_alive()
        if self.asleep_tags:
            raise EngineAsleep(f"the engine sleeps ({', '.join(sorted(self.asleep_tags))}) for a training step; "
                               "retry after it")
        params = self.sampling_params(opts)
        rid = f"req-{next(self._ids)}"
        self.generations += 1
        q: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = (asyncio.get_running_loop(), q)
        self._cmds.put(("add", (rid, list(prompt_ids), params)))
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

    # ---- the GPU lifecycle -----------------------------------------------------------------------
    # One step on a GPU (TRL, verl and NeMo RL do the same):
    #   generate -> sleep(level) [abort in-flight; KV cache dropped; weights to host memory (level 1)
    #   or dropped (level 2: a push follows)] -> train -> update_weights() [wake "weights", reload,
    #   reset prefix cache; KV stays asleep] -> wake() [wake "kv_cache"] -> generate ...
    # A push into sleeping weights would write into unmapped memory, and the next wake_up would copy
    # the stale backup over it: update_weights therefore always wakes the weights first. On CPU the
    # same calls free and re-allocate the same memory (engine/cpu_sleep.py).
    @property
    def awake(self) -> bool:
        return not self.asleep_tags

    async def sleep(self, level: int = KEEP_WEIGHTS) -> int:
        """Free the engine's memory for training. Returns how many in-flight requests were aborted.

        Level 2 (DISCARD_WEIGHTS) also drops the weights instead of keeping a copy: for a step that
        ends with a full weight push, which is then required before anything is generated.
        vLLM's own sleep drops unfinished requests inside its scheduler without an output, so their
        streams would never end and the engine thread would spin: they are aborted here first and
        their streams raise EngineAsleep.
        """
        if level not in (KEEP_WEIGHTS, DISCARD_WEIGHTS):
            raise ValueError(f"sleep level {level}: 1 keeps the weights, 2 discards them")
        return await self._call(lambda llm: self._sleep(llm, level), "sleep")

    async def wake(self, tags: Iterable[str] = SLEEP_TAGS) -> None:
        """Wake the given memory pools (both by default); generation needs both."""
        wanted = set(tags)
        if not wanted <= set(SLEEP_TAGS):
            raise ValueError(f"unknown sleep tags {sorted(wanted - set(SLEEP_TAGS))}; known: {SLEEP_TAGS}")
        if WEIGHTS in wanted and self.weights_discarded:
            raise EngineAsleep("the weights were discarded by a level-2 sleep: push weights (update_weights) "
                               "before waking them")
        await self._call(lambda llm: self._wake(llm, wanted), "wake")

    async def vllm_state(self) -> VLLMState:
        return await self._call(lambda llm: VLLMState(llm.llm_engine.is_sleeping(),
                                                      llm.llm_engine.has_unfinished_requests()))

    def _sleep(self, llm: Any, level: int) -> int:
        rids = list(self._streams) + sorted(self._mirrored)
        if rids:
            self._record(f"abort:{len(rids)}")
            llm.llm_engine.abort_request(rids)
            for rid in rids:
                self._push(rid, EngineAsleep("the engine went to sleep for a training step; retry after it"))
        self._mirrored.clear()
        self.aborted_at_sleep += len(rids)
        if not self.asleep_tags:
            self._record(f"sleep:{level}")
            gpu = on_gpu()
            if not gpu:
                _quiet_cpu_worker()
            llm.sleep(level=level)  # on CPU: pauses the scheduler and marks the pools asleep, frees nothing
            if not gpu:
                llm.collective_rpc(cpu_sleep.release,
                                   args=((KV_CACHE,) if level == KEEP_WEIGHTS else (KV_CACHE, WEIGHTS),))
            self.asleep_tags = set(SLEEP_TAGS)
            self.weights_discarded = level == DISCARD_WEIGHTS
        return len(rids)

    def _wake(self, llm: Any, tags: set[str]) -> None:
        todo = [t for t in SLEEP_TAGS if t in tags and t in self.asleep_tags]
        if todo:
            self._record("wake_up:" + ",".join(todo))
            if not on_gpu():  # memory first: vLLM's scheduler resumes once every pool is awake
                llm.collective_rpc(cpu_sleep.restore, args=(tuple(todo),))
            llm.wake_up(tags=todo)
            self.asleep_tags -= set(todo)

    def _record(self, call: str) -> None:
        self.lifecycle.append(call)
        del self.lifecycle[:-1000]  # a long run keeps only the recent history

    async def update_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> float:
        """Load new weights into the engine, then drop the prefix cache. Returns seconds.

        Wakes the weights first when they sleep and leaves the KV cache as it was: generation wakes it.
        Names and shapes are checked first: a failed reload leaves parameters on the meta device and
        the next forward would kill the engine.
        """
        tensors = [(n, t.detach()) for n, t in named_tensors]
        check_weights(tensors, self.weight_shapes)
        if self.weights_discarded:  # nothing of the old weights is left to fall back on
            missing = sorted(set(self.weight_shapes) - {n for n, _ in tensors})
            if missing:
                raise ValueError(f"the weights were discarded by a level-2 sleep and this push lacks "
                                 f"{len(missing)} of them, e.g. {missing[:3]}")
        t0 = time.perf_counter()

        def push(llm: Any) -> None:
            self._wake(llm, {WEIGHTS})
            self._record("reload_weights")
            llm.collective_rpc(_reload_weights, args=(tensors,))
            self.weights_discarded = False
            self._record("reset_prefix_cache")
            llm.reset_prefix_cache()

        await self._call(push, "push")
        self.weight_version += 1
        return time.perf_counter() - t0

    async def load_adapter(self, folder: str | Path) -> float:
        """Serve the LoRA adapter saved in `folder` (PEFT layout) from now on, in place of the last
        one; the base weights stay as they are. Same lifecycle as update_weights. Returns seconds."""
        from vllm.lora.request import LoRARequest

        if self.cfg.max_lora_rank is None:
            raise ValueError("this engine was started without LoRA (EngineConfig.max_lora_rank)")
        if self.weights_discarded:
            raise EngineAsleep("the base weights were discarded by a level-2 sleep: an adapter needs them")
        t0 = time.perf_counter()
        version = self.weight_version + 1
        new = LoRARequest(f"policy-v{version}", version, str(folder))  # a new id: vLLM caches by id

        def push(llm: Any) -> None:
            self._wake(llm, {WEIGHTS})
            if self.adapter is not None:
                self._record("remove_lora")
                llm.llm_engine.remove_lora(self.adapter.lora_int_id)
            self._record("add_lora")
            if not llm.llm_engine.add_lora(new):
                raise RuntimeError(f"vLLM did not load the adapter in {folder}")
            self.adapter = new
            self._record("reset_prefix_cache")
            llm.reset_prefix_cache()

        await self._call(push, "push")
        self.weight_version = version
        return time.perf_counter() - t0


def _quiet_cpu_worker() -> None:
    # vLLM's CPU worker warns at every sleep and wake that it frees nothing: engine/cpu_sleep.py does
    logger = logging.getLogger("vllm.v1.worker.cpu_worker")
    if not logger.filters:
        logger.addFilter(lambda rec: "sleep mode is not supported" not in rec.getMessage())


def _described(cmd: tuple[str, Any]) -> tuple[str, Any]:
    """A command as a tensor-parallel member can receive it: calls (closures) by their name."""
    return ("call", cmd[1][3]) if cmd[0] == "call" else cmd


def _reload_weights(worker: Any, tensors: list[tuple[str, Any]]) -> bool:
    # `model.load_weights` fails on CPU (the backend repacks linear weights after loading);
    # reload_weights re-runs that processing. The worker's public method sets the current vLLM
    # config around the model runner's (newer vLLM asserts it); older workers lack it.
    reload = getattr(worker, "reload_weights", None) or worker.model_runner.reload_weights
    reload(weights_iterator=iter(tensors))
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


def _client_errors() -> tuple[type[BaseException], ...]:
    """What vLLM raises for a bad request: VLLMClientError in newer versions, ValueError in older."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:
        return (ValueError, TypeError, OverflowError)
    return (ValueError, TypeError, OverflowError, VLLMClientError)


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
