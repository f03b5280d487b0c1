"""A trainer killed with SIGKILL leaves no Gym process behind.

A small driver (a stand-in for the trainer, run as its own process) starts real Gym servers
against the real engine and reports its Gym process group. The test kills the driver with
SIGKILL, so nothing in it gets to clean up, and then waits for every Gym process to be gone: the
launcher notices its parent is dead and ends the group.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gym.proctree import group_pids, pids_mentioning

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent

DRIVER = r"""
import asyncio, json, sys
from pathlib import Path
from gym.config import GymConfig
from gym.servers import GymServers

async def main(base_url, model, log_dir):
    config = GymConfig(envs=[{"name": "string_match", "config": "string_match",
                              "train_data": "resources_servers/string_match/data/example.jsonl"}],
                       head_port=0, startup_timeout_s=300)
    servers = GymServers(config)
    await servers.start(base_url, model, None, Path(log_dir))
    print(json.dumps({"pgid": servers.pgid, "pids": servers.processes()}), flush=True)
    await asyncio.sleep(3600)

asyncio.run(main(*sys.argv[1:]))
"""


def _wait_gone(pgid: int, log_dir: Path, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        left = sorted(set(group_pids(pgid)) | set(pids_mentioning(str(log_dir))))
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def test_sigkill_of_the_trainer_leaves_no_gym_process(policy_server, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    log_dir = tmp_path / "gym"
    driver = subprocess.Popen(
        [sys.executable, str(script), policy_server.base_url, policy_server.model_name, str(log_dir)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    try:
        line = driver.stdout.readline()
        assert line, f"driver exited with {driver.wait()} before Gym was up (see {log_dir}/launcher.log)"
        info = json.loads(line)
        pgid = info["pgid"]
        assert len(group_pids(pgid)) >= 4        # launcher, 3 servers (and their shell wrappers)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        assert _wait_gone(pgid, log_dir, timeout_s=30) == []
    finally:
        if driver.poll() is None:
            driver.kill()


def test_a_server_that_cannot_start_is_named_with_the_end_of_its_log(policy_server, tmp_path):
    from gym.config import GymConfig
    from gym.servers import GymServers, GymStartError

    config = GymConfig(
        envs=[{"name": "string_match", "config": "string_match",
               "train_data": "resources_servers/string_match/data/example.jsonl",
               "overrides": {"string_match": {"resources_servers": {"string_match": {"entrypoint": "missing_app.py"}}}}}],
        head_port=0, startup_timeout_s=300)
    servers = GymServers(config)
    with pytest.raises(GymStartError) as failure:
        policy_server.run(servers.start(policy_server.base_url, policy_server.model_name, None, tmp_path / "gym"))
    message = str(failure.value)
    assert "exited: string_match\n" in message
    assert "can't open file" in message and "missing_app.py" in message   # the tail of its log
    assert servers.processes() == []
