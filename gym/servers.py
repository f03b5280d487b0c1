"""NeMo Gym as one supervised process group, seen from the trainer.

`GymServers.start()` runs gym/launcher.py with the Gym venv's Python as the leader of a new
process group; the launcher starts the head server, Ray and every configured server inside that
group. So one `killpg` ends everything, and:
- `stop()` (also run at exit) ends the group: SIGTERM, a grace period, SIGKILL (signals are
  trainer.py's: it turns SIGINT/SIGTERM/SIGHUP into a clean stop);
- if the trainer dies without running anything (SIGKILL), the launcher sees its parent gone and
  ends the group itself.

Who restarts what: the launcher alone restarts servers (one that dies, or that answers no HTTP
request for `gym.hung_after_s`) on the same port; this side reads its status (gym/protocol.py),
relaunches the launcher only if the launcher itself is gone, and probes which servers answer, for
`status()` and for `wait_healthy()`, which rollouts call before retrying a failed post.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any

import aiohttp

from gym.config import GymConfig
from gym.proctree import descendants, group_pids, pids_mentioning
from gym.protocol import KINDS, LaunchSpec, LauncherStatus, ServerStatus

LAUNCHER = Path(__file__).resolve().parent / "launcher.py"
_LIVE: "weakref.WeakSet[GymServers]" = weakref.WeakSet()
MAX_FAILED_GROUP_RESTARTS = 3


class GymStartError(RuntimeError):
    """Gym did not come up; the message names the server(s) and shows the end of their logs."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gym_environment() -> dict[str, str]:
    """Our environment for the Gym processes, minus any preloaded library: an allocator preloaded
    for the trainer (vLLM's CPU docs recommend tcmalloc) is for vLLM and torch, and Gym's servers
    are other programs, on another Python."""
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    return env


def tail(path: Path | str | None, lines: int = 30) -> str:
    if path is None or not Path(path).exists():
        return "(no log)"
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64_000))
        text = f.read().decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


async def _port_answers(host: str, port: int, timeout_s: float = 2.0) -> bool:
    """True when the server answers an HTTP request (any status) in time; a stopped process's
    port still accepts TCP connections, so a connect alone would call a hung server up."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
            async with session.get(f"http://{host}:{port}/") as resp:
                await resp.read()
        return True
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
        return False


class GymServers:
    """Start, watch, query and stop the NeMo Gym servers of one run."""

    def __init__(self, config: GymConfig, watch_interval_s: float = 1.0) -> None:
        self.config = config
        self.watch_interval_s = watch_interval_s
        self.group_restarts = 0
        self.log_dir: Path | None = None
        self._proc: subprocess.Popen | None = None
        self._pgid: int | None = None
        self._start_args: tuple[str, str, str | None, Path] | None = None
        self._head_port: int | None = None
        self._instances: dict[str, dict[str, Any]] = {}   # from the head server's /server_instances
        self._status = LauncherStatus()                   # the launcher's status.json
        self._up: dict[str, bool] = {}                    # port probes by the watchdog
        self._watchdog: asyncio.Task | None = None
        self._healthy = asyncio.Event()
        self._stopping = False
        self._restart_lock: asyncio.Lock | None = None
        self._failed_restarts = 0
        self.failed: GymStartError | None = None    # set once group restarts keep failing

    # -- start --------------------------------------------------------------------------------
    async def start(self, policy_base_url: str | list[str], model_name: str, api_key: str | None,
                    log_dir: Path) -> None:
        """Launch Gym and return once the head server and every configured server answer."""
        self._start_args = (policy_base_url, model_name, api_key, Path(log_dir))
        self._restart_lock = asyncio.Lock()
        await self._launch()
        self._watchdog = asyncio.get_running_loop().create_task(self._watch(), name="gym-watchdog")

    def _spec(self, policy_base_url: str | list[str], model_name: str, api_key: str | None, log_dir: Path) -> LaunchSpec:
        cfg = self.config
        return LaunchSpec(
            config_paths=[str(p) for p in cfg.config_paths()], policy_base_url=policy_base_url,
            policy_api_key=api_key or "unused", policy_model_name=model_name,
            head_server={"host": "127.0.0.1", "port": self._head_port},
            port_range_low=cfg.port_range[0], port_range_high=cfg.port_range[1],
            server_spinup_timeout_seconds=cfg.startup_timeout_s,
            model_endpoint_readiness_timeout_seconds=cfg.startup_timeout_s,
            overrides=cfg.gym_overrides(), gym_venv=str(cfg.venv_path()), venv_root=str(log_dir / "venvs"),
            server_log_dir=str(log_dir / "servers"), status_path=str(log_dir / "status.json"),
            parent_pid=os.getpid(), hung_after_s=cfg.hung_after_s,
        )

    async def _launch(self) -> None:
        assert self._start_args is not None
        policy_base_url, model_name, api_key, log_dir = self._start_args
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir
        if self._head_port is None:
            self._head_port = self.config.head_port or free_port()
        spec = self._spec(policy_base_url, model_name, api_key, log_dir)
        spec.write(log_dir / "spec.json")
        status_path = log_dir / "status.json"
        status_path.unlink(missing_ok=True)
        self._status, self._instances, self._up = LauncherStatus(), {}, {}
        self._healthy.clear()
        with open(log_dir / "launcher.log", "ab") as log:
            # -P: our sibling modules (gym/config.py, ...) must not lead the Gym venv's sys.path.
            self._proc = subprocess.Popen(
                [str(self.config.venv_path() / "bin" / "python"), "-P", str(LAUNCHER), str(log_dir / "spec.json")],
                cwd=str(log_dir), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env=gym_environment(),
            )
        self._pgid = self._proc.pid
        _LIVE.add(self)
        _install_exit_hooks()
        try:
            await self._wait_ready(self.config.startup_timeout_s + 30)
        except BaseException:
            await asyncio.to_thread(self._kill_group)
            raise
        self._instances = await self._fetch_instances()
        for name in self._instances:
            self._up[name] = True
        self._healthy.set()

    async def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            self._status = self._read_status()
            state = self._status.state
            if state == "ready":
                return
            exited = self._proc.poll() is not None
            if state == "failed" or exited or time.monotonic() > deadline:
                why = self._status.error or (
                    f"launcher exited with code {self._proc.returncode}" if exited else f"not ready after {timeout_s:.0f}s")
                raise GymStartError(await self._explain(why))
            await asyncio.sleep(0.25)

    async def _explain(self, why: str) -> str:
        """Name the servers that exited (else those not answering), with the end of each one's log."""
        servers = self._status.servers
        # The launcher records who was up when the start failed, before it stopped them all.
        health = {n: s.at_failure for n, s in servers.items() if s.at_failure is not None}
        if not health:
            health = {n: {"alive": True, "answering": bool(s.port and await _port_answers(s.host, s.port))}
                      for n, s in servers.items()}
        exited = [n for n, h in health.items() if not h["alive"]]
        silent = [n for n, h in health.items() if h["alive"] and not h["answering"]]
        parts = [f"NeMo Gym did not start: {why}"]
        if exited:
            parts.append(f"exited: {', '.join(exited)}")
        if silent:
            parts.append(f"not answering yet: {', '.join(silent)}")
        for name in exited or silent:
            parts.append(f"--- {name} ({servers[name].log_path}) ---\n{tail(servers[name].log_path)}")
        assert self.log_dir is not None
        parts.append(f"--- launcher ({self.log_dir / 'launcher.log'}) ---\n{tail(self.log_dir / 'launcher.log', 40)}")
        return "\n".join(parts)

    def _read_status(self) -> LauncherStatus:
        if self.log_dir is None:
            return LauncherStatus()
        try:
            return LauncherStatus.read(self.log_dir / "status.json")
        except (OSError, ValueError):
            return self._status   # not written yet, or mid-replace: keep the last one

    async def _fetch_instances(self) -> dict[str, dict[str, Any]]:
        url = f"http://127.0.0.1:{self._head_port}/server_instances"
        async with aiohttp.ClientSession() as session:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
                resp.raise_for_status()
                return {inst["config_path"]: inst for inst in await resp.json()}

    # -- queries ------------------------------------------------------------------------------
    @property
    def head_url(self) -> str:
        return f"http://127.0.0.1:{self._head_port}"

    @property
    def pgid(self) -> int | None:
        return self._pgid

    def agent_url(self, agent_name: str) -> str:
        inst = self._instances.get(agent_name)
        if inst is None or inst.get("server_type") != "responses_api_agents":
            agents = [n for n, i in self._instances.items() if i.get("server_type") == "responses_api_agents"]
            raise KeyError(f"no Gym agent named {agent_name!r} (agents: {agents})")
        return f"http://{inst['host']}:{inst['port']}"

    def server_pids(self, name: str) -> list[int]:
        """The pids serving one Gym server: its shell wrapper and everything under it."""
        state = self._status.servers.get(name)
        return [state.pid, *descendants(state.pid)] if state and state.pid else []

    def processes(self) -> list[int]:
        """Every live process of this Gym run: its process group, plus anything that left the group
        but still runs from this run's folder (a server started from its venv symlinks)."""
        pids = set(group_pids(self._pgid)) if self._pgid else set()
        if self.log_dir is not None:
            pids |= set(pids_mentioning(str(self.log_dir)))
        return sorted(pids)

    @property
    def restarts(self) -> int:
        """Every restart so far: single servers (by the launcher) and whole groups (by the watchdog)."""
        return self.group_restarts + sum(s.restarts for s in self._status.servers.values())

    def status(self) -> list[ServerStatus]:
        launcher_up = self._proc is not None and self._proc.poll() is None
        log_dir = self.log_dir or Path(".")
        out = [
            ServerStatus(name="launcher", kind="launcher", up=launcher_up, restarts=self.group_restarts,
                         log_path=str(log_dir / "launcher.log")),
            ServerStatus(name="head", kind="head", up=launcher_up and self._up.get("head", launcher_up),
                         restarts=self.group_restarts, log_path=str(log_dir / "launcher.log"), url=self.head_url),
        ]
        for name, s in self._status.servers.items():
            out.append(ServerStatus(
                name=name, kind=KINDS.get(s.type, s.type or "?"), up=bool(self._up.get(name, False)),
                restarts=s.restarts, log_path=s.log_path, url=f"http://{s.host}:{s.port}" if s.port else None,
            ))
        return out

    async def wait_healthy(self, timeout_s: float | None = None) -> None:
        """Return once every server answered the watchdog's last probe (after a restart, say)."""
        timeout_s = self.config.startup_timeout_s + 30 if timeout_s is None else timeout_s
        try:
            await asyncio.wait_for(self._healthy.wait(), timeout_s)
            if self.failed is not None:
                raise GymStartError(f"Gym is down and could not be restarted: {self.failed}")
        except asyncio.TimeoutError:
            down = [s.name for s in self.status() if not s.up]
            raise GymStartError(f"Gym servers still down after {timeout_s:.0f}s: {', '.join(down)}") from None

    # -- watchdog -----------------------------------------------------------------------------
    async def _watch(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.watch_interval_s)
            if self._stopping:
                return
            try:
                await self._check_once()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the watchdog must outlive whatever went wrong once
                print(f"[gym] watchdog: {type(error).__name__}: {error}", file=sys.stderr, flush=True)

    async def _check_once(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            print(f"[gym] launcher exited (code {self._proc.returncode}); restarting the Gym group",
                  file=sys.stderr, flush=True)
            await self.restart_group()
            return
        before = {n: v.restarts for n, v in self._status.servers.items()}
        self._status = self._read_status()
        for name, v in self._status.servers.items():
            if v.restarts > before.get(name, v.restarts):
                print(f"[gym] `{name}` was restarted by the launcher (restart #{v.restarts}; dead or hung); "
                      "its rollouts are retried", file=sys.stderr, flush=True)
        probes: dict[str, Any] = {"head": ("127.0.0.1", self._head_port)}
        for name, s in self._status.servers.items():
            probes[name] = (s.host, s.port)
        names = list(probes)
        answers = await asyncio.gather(*(_port_answers(h, p) if p else _false() for h, p in probes.values()))
        self._up = dict(zip(names, answers))
        if all(answers):
            self._healthy.set()
        else:
            self._healthy.clear()

    async def restart_group(self) -> None:
        """Stop whatever is left of the group and start it again with the same arguments."""
        assert self._restart_lock is not None
        async with self._restart_lock:
            if self._stopping or self.failed is not None:
                return
            self._healthy.clear()
            await asyncio.to_thread(self._kill_group)
            self.group_restarts += 1
            try:
                await self._launch()
                self._failed_restarts = 0
            except GymStartError as error:
                self._failed_restarts += 1
                if self._failed_restarts >= MAX_FAILED_GROUP_RESTARTS:
                    self.failed = error   # give up: wait_healthy raises this from now on
                    self._healthy.set()
                raise

    # -- stop ---------------------------------------------------------------------------------
    async def stop(self) -> None:
        self._stopping = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            try:
                await self._watchdog
            except (asyncio.CancelledError, Exception):
                pass
            self._watchdog = None
        await asyncio.to_thread(self._kill_group)

    def stop_sync(self) -> None:
        """For atexit and signal handlers, where no event loop may be running."""
        self._stopping = True
        self._kill_group()

    def _kill_group(self, grace_s: float = 15.0) -> None:
        """SIGTERM the launcher (it shuts Gym down in order), then SIGKILL whatever is left."""
        proc, pgid = self._proc, self._pgid
        if proc is None or pgid is None:
            return
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 2.0
        while True:
            members = group_pids(pgid)
            if not members:
                break
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._healthy.clear()
        _LIVE.discard(self)


async def _false() -> bool:
    return False


# -- leave nothing behind ---------------------------------------------------------------------
_hooks_installed = False


def _stop_all() -> None:
    for servers in list(_LIVE):
        try:
            servers.stop_sync()
        except Exception:
            pass


def _install_exit_hooks() -> None:
    """atexit: a process that exits without calling stop() still ends Gym. Signals are the
    trainer's to handle (trainer.py turns SIGINT/SIGTERM/SIGHUP into a clean stop that writes the
    run's status); a process killed outright is covered by the launcher watching its parent."""
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(_stop_all)
