"""GRPO with NeMo Gym, in one process.

    python trainer.py config.yaml               # train; dashboard at http://127.0.0.1:8080
    python trainer.py config.yaml --resume      # continue a killed run from its last checkpoint
    python trainer.py config.yaml --eval 4      # 4 rollouts per eval row, print per-env metrics
    python trainer.py config.yaml --serve       # only the policy endpoint (+ dashboard)
    python trainer.py config.yaml --export DIR  # the run's last checkpoint as a plain HF folder
    python trainer.py config.yaml --set grpo.steps=5 --set run.name=try1
    torchrun --nproc_per_node 8 trainer.py config.yaml   # a rank (engine + endpoint + trainer) per GPU

One asyncio loop serves the policy endpoint and the dashboard (one Starlette app under uvicorn),
drives vLLM in-process, talks to the NeMo Gym subprocesses over HTTP, and runs the GRPO loop with
its training compute in a worker thread.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import yaml

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # before vLLM is imported
os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))  # before torch is imported

from engine.cpu_allocator import has_gpu, preload  # noqa: E402
from grpo.config import Config, ConfigError, load_config  # noqa: E402
from grpo.export import latest_checkpoint  # noqa: E402

log = logging.getLogger("trainer")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="path to config.yaml")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--serve", action="store_true", help="serve the policy endpoint and dashboard only")
    mode.add_argument("--eval", type=int, metavar="N", help="collect N rollouts per eval row, no training")
    mode.add_argument("--export", metavar="DIR", type=Path,
                      help="write the run's last checkpoint (or --checkpoint) as a Hugging Face folder, then exit")
    p.add_argument("--checkpoint", metavar="PATH", type=Path,
                   help="with --export: this checkpoint folder instead of the run's last one")
    p.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (YAML value), e.g. --set grpo.steps=5")
    return p.parse_args(argv)


def overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair}: expected KEY=VALUE")
        k, v = pair.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


async def start_engine(cfg: Config, rank: int, world: int):
    from engine.engine import Engine, EngineConfig
    from engine.models import resolve_model
    from engine.tp import Mirror

    path = resolve_model(cfg.model.name)
    tp = cfg.engine.tensor_parallel_size
    mirror = Mirror(world, tp, rank) if tp > 1 else None
    # the members of a tensor-parallel group sample together: one seed per group
    engine = Engine(EngineConfig(model=path, max_model_len=cfg.model.max_model_len, dtype=cfg.model.dtype,
                                 seed=cfg.run.seed + rank // tp, max_num_seqs=cfg.engine.max_num_seqs,
                                 external_launcher=world > 1, tensor_parallel_size=tp,
                                 gpu_memory_utilization=cfg.engine.gpu_memory_utilization,
                                 cpu_kv_cache_gib=cfg.engine.cpu_kv_cache_gib,
                                 enforce_eager=cfg.engine.enforce_eager,
                                 max_num_batched_tokens=cfg.engine.max_num_batched_tokens,
                                 max_lora_rank=cfg.model.lora.r if cfg.model.lora else None), mirror)
    return await engine.start(), path


def progress_bar(cfg: Config, start: int):
    from tqdm import tqdm

    from store import metrics as M

    bar = tqdm(total=cfg.grpo.steps, initial=start, unit="step", dynamic_ncols=True)

    def update(step: int, m: dict[str, float]) -> None:
        nan = float("nan")
        bar.set_postfix_str(
            f"reward {m[M.REWARD_MEAN]:.3f} loss {m.get(M.LOSS, nan):+.4f} "
            f"tmpe {m.get(M.TOKEN_MULT_PROB_ERROR, nan):.4f} ent {m.get(M.ENTROPY, nan):.3f} "
            f"gen {m[M.TIME_GENERATION_S]:.1f}s train {m[M.TIME_TRAINING_S]:.1f}s "
            f"sync {m[M.TIME_WEIGHT_SYNC_S]:.2f}s lag99 {m[M.LOOP_LAG_P99_MS]:.0f}ms")
        bar.update(step - bar.n)

    return bar, update


async def main(cfg: Config, args: argparse.Namespace) -> int:
    import aiohttp
    from starlette.applications import Starlette

    from dashboard.app import dashboard_routes
    from engine.engine import on_gpu
    from engine.server import HTTPServer, SamplingPin, ServerConfig, policy_routes
    from grpo import ranks
    from grpo.conductor import LeaderEngine, LeaderPin, LeaderPolicy, follow, gather_endpoints, tell
    from grpo.loop import limit_heap_fragmentation
    from gym.rollouts import collect, env_metrics, load_env_rows
    from gym.servers import GymServers

    world, rank = ranks.world_size(), ranks.rank()
    if world % cfg.engine.tensor_parallel_size:
        print(f"error: engine.tensor_parallel_size {cfg.engine.tensor_parallel_size} must divide the number of "
              f"ranks ({world})", file=sys.stderr)
        return 2
    if world > 1 and cfg.grpo.offload_params and cfg.model.lora is None:
        print("error: grpo.offload_params is for one GPU: with several ranks FSDP already shards the weights",
              file=sys.stderr)
        return 2
    serves = rank % cfg.engine.tensor_parallel_size == 0  # a tensor-parallel group's first rank serves it
    run_dir = cfg.run_dir.resolve()
    training = not (args.serve or args.eval)
    if training and not args.resume and latest_checkpoint(run_dir) is not None:
        print(f"error: run {run_dir} already has checkpoints; pass --resume or pick another run.name",
              file=sys.stderr)
        return 2
    run_dir.mkdir(parents=True, exist_ok=True)
    gym = GymServers(cfg.gym)  # started by rank 0 only
    if cfg.run.cpu_heap_mmap_mib is not None and not on_gpu():
        limit_heap_fragmentation(cfg.run.cpu_heap_mmap_mib)  # before the engine allocates anything
    engine, model_path = await start_engine(cfg, rank, world)
    # The engine installs its own SIGINT/SIGTERM handlers; ours replace them so that Ctrl-C, a kill
    # or a closed terminal cancels the run at once and the `finally` below writes the run's status
    # and stops Gym, the server and the engine. This is the process's only signal handling.
    main_task = asyncio.current_task()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        asyncio.get_running_loop().add_signal_handler(sig, main_task.cancel)
    # the loop declares the training temperature while it collects rollouts (on every rank's endpoint)
    pin = LeaderPin() if world > 1 and rank == 0 else SamplingPin()
    server_cfg = ServerConfig(model_name=cfg.server.model_name, api_key=cfg.server.api_key,
                              default_temperature=cfg.grpo.temperature, default_max_tokens=cfg.grpo.max_tokens,
                              tool_parser=cfg.server.tool_parser, strict_sampling=not args.serve, pin=pin)
    routes = policy_routes(engine, server_cfg)
    if rank == 0:
        routes += dashboard_routes(Path(cfg.run.dir), gym_status=gym.status, token=cfg.server.dashboard_token)
    port = cfg.server.port + rank if cfg.server.port else 0  # every serving rank its own endpoint
    http = await HTTPServer.start(Starlette(routes=routes), cfg.server.host, port) if serves else None
    base = f"http://127.0.0.1:{http.port}" if http else None
    endpoints = gather_endpoints(f"{base}/v1" if base else None) if world > 1 else [f"{base}/v1"]
    if http:
        print(f"policy endpoint {base}/v1" + (f"   dashboard {base}/" if rank == 0 else f"   (rank {rank})"),
              flush=True)
    store = None
    status = "failed"  # unless the run completes; a cancelled (Ctrl-C) run says "interrupted"
    try:
        if rank > 0:  # a follower: its endpoint (if it serves) serves Gym; it sleeps, trains, pushes when rank 0 says
            from grpo.policy import PolicyTrainer

            policy = await asyncio.to_thread(PolicyTrainer, model_path, trainer_config(cfg), cfg.run.seed) \
                if training else None
            await follow(engine, policy, pin, run_dir / "adapters" / f"rank{rank}")
            status = "finished"
            return 0
        if args.serve:
            await asyncio.Event().wait()
        await gym.start(endpoints if len(endpoints) > 1 else endpoints[0], cfg.server.model_name, cfg.server.api_key,
                        run_dir / "gym")
        timeout = aiohttp.ClientTimeout(total=None)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
            if args.eval:
                rows = load_env_rows(cfg.gym, "eval") or load_env_rows(cfg.gym, "train")
                rollouts = await collect(rows, args.eval, gym, session, cfg.gym.concurrency,
                                         cfg.gym.request_timeout_s, cfg.gym.max_retries)
                for k, v in env_metrics(rollouts).items():
                    print(f"{k:40s} {v:.4f}")
                if world > 1:
                    await asyncio.to_thread(tell, "stop")
                status = "finished"
                return 0
            from grpo.loop import GRPOLoop
            from grpo.policy import PolicyTrainer
            from store.db import RunStore

            store = RunStore.open(run_dir)
            policy = await asyncio.to_thread(PolicyTrainer, model_path, trainer_config(cfg), cfg.run.seed)
            if world > 1:  # every lifecycle and training call is told to the followers first
                engine, policy, pin.armed = LeaderEngine(engine), LeaderPolicy(policy), True
            loop = GRPOLoop(cfg, engine, gym, store, policy, load_env_rows(cfg.gym, "train"), pin=pin,
                            eval_rows=load_env_rows(cfg.gym, "eval"))
            store.start_run(cfg.run.name, cfg.model_dump(mode="json"), cfg.model.name)
            store.set_status("running")
            if args.resume:
                await loop.resume()
            else:  # steps of an attempt that died before its first checkpoint
                store.truncate_after(0)
            bar, update = progress_bar(cfg, loop.step)
            loop.progress = update
            with bar:
                await loop.run(session)
            if world > 1:
                await asyncio.to_thread(tell, "stop")
            status = "finished"
            return 0
    except asyncio.CancelledError:
        status = "interrupted"
        raise
    finally:
        if store is not None:  # first: the awaits below may be cancelled again by a second Ctrl-C
            store.finish_run(status)
        await gym.stop()
        if http:
            await http.stop()
        await engine.shutdown()
        if world > 1:
            from grpo.loop import peak_memory_gib

            print(f"rank {rank}: served {engine.generations} generations, peak memory {peak_memory_gib():.2f} GiB",
                  flush=True)


def export(cfg: Config, checkpoint: Path | None, out: Path) -> Path:
    """The checkpoint (default: the run's last) as a plain Hugging Face folder at `out`."""
    from engine.models import resolve_model
    from grpo.export import export_checkpoint

    checkpoint = checkpoint or latest_checkpoint(cfg.run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"run {cfg.run_dir} has no checkpoint to export; pass --checkpoint PATH")
    return export_checkpoint(checkpoint, resolve_model(cfg.model.name), out, cfg.model.lora)


def export_finished_run(cfg: Config) -> int:
    """The run's last checkpoint as cfg.export_dir, once the engine, Gym and the trainer are gone:
    the export loads a second copy of the model, which must not add to the run's peak memory."""
    from grpo.export import ExportError

    ckpt = latest_checkpoint(cfg.run_dir)
    try:
        out = export(cfg, ckpt, cfg.export_dir)
    except (ExportError, FileNotFoundError, ValueError) as e:
        print(f"error: export failed ({e}); the run's checkpoints are kept: retry with --export DIR",
              file=sys.stderr)
        return 1
    print(f"exported {ckpt.name} to {out}", flush=True)
    return 0


def trainer_config(cfg: Config):
    from grpo.loss import LossConfig
    from grpo.policy import TrainerConfig

    g = cfg.grpo
    return TrainerConfig(
        lr=g.lr, weight_decay=g.weight_decay, max_grad_norm=g.max_grad_norm, warmup_steps=g.warmup_steps,
        lr_schedule=g.lr_schedule, total_steps=g.steps * g.num_minibatches,
        micro_batch_tokens=g.micro_batch_tokens, pack_shared_prefix=g.pack_shared_prefix,
        gradient_checkpointing=g.gradient_checkpointing, measure_zero_advantage=g.measure_zero_advantage,
        dtype=cfg.model.dtype, temperature=g.temperature, num_minibatches=g.num_minibatches, lora=cfg.model.lora,
        loss=LossConfig(kind=g.loss, ratio_clip_c=g.ratio_clip_c,
                        constant_normalizer=g.dr_grpo_normalizer or g.max_tokens,
                        clip_low=g.clip_low, clip_high=g.clip_high, normalization=g.normalization,
                        kl_beta=g.kl_beta, tis_cap=g.tis_cap, kl_log_ratio_clamp=g.kl_log_ratio_clamp,
                        kl_max=g.kl_max),
    )


def cli(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, overrides(args.set))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if cfg.run.cpu_allocator is not None and not args.export and not has_gpu():
        preload(cfg.run.cpu_allocator)  # re-executes this command (before torch and vLLM are imported)
    if args.export:
        from grpo.export import ExportError

        try:
            print(f"exported to {export(cfg, args.checkpoint, args.export)}")
        except (ExportError, FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.checkpoint:
        print("error: --checkpoint goes with --export", file=sys.stderr)
        return 2
    from grpo import ranks

    world = ranks.init()  # under torchrun / accelerate launch: one rank per GPU (grpo/conductor.py)
    try:
        code = asyncio.run(main(cfg, args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; the last checkpoint can be resumed with --resume", file=sys.stderr)
        code = 130
    if code == 0 and cfg.run.export and not (args.serve or args.eval) and ranks.rank() == 0:
        code = export_finished_run(cfg)
    if world > 1:  # a rank's listener thread may still wait in a collective its peers left: do not join it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(cli())
