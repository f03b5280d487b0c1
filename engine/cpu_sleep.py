"""Sleep mode for vLLM's CPU worker, which has none: its sleep/wake_up log a warning and free
nothing. This frees the same two pools a GPU worker frees, so that on CPU the trainer gets the
engine's memory during training, and a push into sleeping weights fails here as it would on a GPU.

- "kv_cache": the KV cache's storage is released (resized to 0 bytes) and re-allocated at wake,
  uninitialised, as on a GPU: nothing in it survives a sleep (the prefix cache is reset at every
  push). Pages are mapped as vLLM writes blocks, so a wake costs only what generation then uses.
- "weights", level 2 only: the packed GEMM weights (vLLM's CPU backend repacks every linear layer's
  weight at load and keeps only the packed copy) and every parameter's storage are released. Wake
  re-allocates the parameters uninitialised; only a weight push (reload_weights, which repacks)
  makes the model usable again, which is vLLM's level-2 contract on a GPU too. Level 1 keeps the
  weights: a CPU has nowhere to offload them to. Buffers (the rotary tables) are never released:
  a push does not rewrite them.

Each function runs on the worker (`LLM.collective_rpc`); the released storages are kept on it.
"""

from __future__ import annotations

from typing import Any

WEIGHTS, KV_CACHE = "weights", "kv_cache"
_RELEASED = "_grpo_released"  # worker attribute: pool -> [(storage, its size in bytes)]


def release(worker: Any, pools: tuple[str, ...]) -> int:
    """Release `pools` (KV_CACHE, WEIGHTS) not already released. Returns the bytes freed."""
    released: dict[str, list[tuple[Any, int]]] = worker.__dict__.setdefault(_RELEASED, {})
    freed = 0
    for pool in pools:
        if pool in released:
            continue
        model_runner = worker.model_runner
        if pool == KV_CACHE:
            storages = _unique_storages(model_runner.kv_caches)
        else:
            model = model_runner.get_model()
            for module in model.modules():
                if hasattr(module, "cpu_linear"):  # holds the packed weight: drop it with the closure
                    module.cpu_linear = _discarded
            storages = _unique_storages(model.parameters())
        released[pool] = [(s, s.nbytes()) for s in storages]
        for s, size in released[pool]:
            s.resize_(0)
            freed += size
    return freed


def restore(worker: Any, pools: tuple[str, ...]) -> None:
    """Re-allocate the released `pools`, uninitialised."""
    released: dict[str, list[tuple[Any, int]]] = worker.__dict__.get(_RELEASED, {})
    for pool in pools:
        for s, size in released.pop(pool, []):
            s.resize_(size)


def _unique_storages(tensors: Any) -> list[Any]:
    # the KV caches of all layers are views of one buffer; a tied head shares the embedding's
    seen: dict[int, Any] = {}
    for t in tensors:
        s = t.untyped_storage()
        if s.nbytes():
            seen.setdefault(s.data_ptr(), s)
    return list(seen.values())


def _discarded(*_: Any) -> Any:
    raise RuntimeError("the engine's weights were discarded by a level-2 sleep; push weights before generating")
