"""Start NeMo Gym servers and keep them alive; runs INSIDE the Gym venv (Python 3.13).

    .venv-gym/bin/python -P gym/launcher.py SPEC.json

This file imports only the standard library, nemo_gym (plus what it ships, such as omegaconf) and,
by file path, three stdlib-only siblings: protocol.py (the spec and status records, shared with
gym/servers.py), proctree.py (/proc helpers, shared too) and gym_internals.py (every use of
nemo_gym's private API). The trainer's own packages live in another venv with another Python.

What it does:
- builds the Gym global config from the spec (no CLI parsing, no .env file), points each server's
  venv at a symlink to this very venv (offline: Gym would otherwise `uv venv` from the network),
- drops the environment servers (`/run` relays; rollouts go straight to the agents) and starts a
  lean Ray only if a remaining server still uses Ray,
- starts what Gym's RunHelper would, with Gym's own parts but without importing its CLI (0.16 GiB
  less for the whole run): the head server in this process, every server as a subprocess; it is
  ready once every server answers HTTP,
- writes `status.json` (spec.status_path) so the trainer sees every server, its pid, restarts,
- restarts a server whose process died, or that answered no HTTP request for spec.hung_after_s
  (a stopped or deadlocked process still accepts TCP connections), on the same port; it is the
  only place that restarts a server,
- stops everything on SIGTERM/SIGINT, or when the process that started it is gone, and finally
  kills whatever is left in its process group (Ray daemons included).

The spec is a protocol.LaunchSpec written as JSON.

The trainer starts it as the leader of a new process group and ends that group; this file makes
the same guarantee from the inside, so a trainer killed with SIGKILL still leaves nothing behind.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

WATCH_INTERVAL_S = 0.5
# A server whose process is alive but that has answered no HTTP request for spec.hung_after_s is
# hung; each probe waits at most PROBE_DEADLINE_S.
PROBE_DEADLINE_S = 2.0
DEFAULT_SPINUP_TIMEOUT_S = 600.0   # when the spec sets none


class _Shutdown(BaseException):
    """Raised in the main thread by SIGTERM/SIGINT; a BaseException, so no `except Exception` on the
    way stops it before main's clean-up."""


def _on_signal(signum: int, frame: Any) -> None:
    # Only the first signal interrupts; later ones must not break the shutdown in progress.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise _Shutdown(f"signal {signum}")


def _install_signal_handlers() -> None:
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)


def _watch_parent(parent_pid: int) -> None:
    """SIGTERM ourselves when the process that started us is gone (it may have been SIGKILLed).

    A pid watcher rather than PR_SET_PDEATHSIG: that one fires when the parent *thread* exits,
    and the trainer may spawn us from a thread that ends long before the trainer does.
    """
    while True:
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGTERM)
            return
        time.sleep(WATCH_INTERVAL_S)


def _load_sibling(name: str) -> Any:
    """A stdlib-only module beside this file, loaded by path: this script runs in the Gym venv,
    where our package is not importable (and must not be: its other modules need torch)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_launcher_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


proctree = _load_sibling("proctree")
protocol = _load_sibling("protocol")   # LaunchSpec, LauncherStatus: shared with gym/servers.py
internals = _load_sibling("gym_internals")   # every use of nemo_gym's private API


def _kill_group_members(grace_s: float = 3.0) -> None:
    """TERM then KILL every other process of our group (only when we lead a group of our own)."""
    pgid = os.getpgid(0)
    if pgid != os.getpid():
        return  # started without a group of our own: never signal a group we do not own
    proctree.terminate(proctree.group_pids(pgid, exclude_self=True), grace_s)


def _instance_pids(env_var: str, name: str) -> list[int]:
    """Processes of our group that run Gym server instance `name` (Gym sets `env_var`=name)."""
    return proctree.pids_with_env(proctree.group_pids(os.getpgid(0), exclude_self=True), env_var, name)


def _server_entries(global_config_dict: Any) -> list[tuple[str, str, str, str]]:
    """(instance name, server type, server name, entrypoint) for every server Gym will run.

    The same walk RunHelper does: top-level key -> server type -> server name -> {entrypoint}.
    """
    from omegaconf import DictConfig

    entries = []
    for top_level, value in global_config_dict.items():
        if top_level in internals.reserved_top_level_keys() or not isinstance(value, DictConfig):
            continue
        server_type = next(iter(value), None)
        inner = value.get(server_type) if server_type is not None else None
        if not isinstance(inner, DictConfig):
            continue
        server_name = next(iter(inner), None)
        cfg = inner.get(server_name) if server_name is not None else None
        if not isinstance(cfg, DictConfig) or "entrypoint" not in cfg:
            continue
        entries.append((str(top_level), str(server_type), str(server_name), str(cfg.entrypoint)))
    return entries


def _declares_no_ray(entry: tuple[str, str, str, str]) -> bool:
    """Whether a server's entrypoint says `ray_enabled = False` (Gym's opt-out of Ray)."""
    _, server_type, server_name, entrypoint = entry
    app = internals.server_dir(server_type, server_name) / entrypoint
    try:
        return "ray_enabled = False" in app.read_text()
    except OSError:
        return False


def _link_venvs(entries: list[tuple[str, str, str, str]], venv_root: Path, gym_venv: Path) -> None:
    """`venv_root/<type>/<name>/.venv` -> the Gym venv, so Gym's skip_venv_if_present finds a venv."""
    for _, server_type, server_name, _ in entries:
        link = venv_root / server_type / server_name / ".venv"
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() and Path(os.readlink(link)) == gym_venv:
            continue
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(gym_venv, target_is_directory=True)


def _http_answers(host: str, port: int, timeout_s: float = PROBE_DEADLINE_S) -> bool:
    """True when the server answers an HTTP request (any status) within the deadline.

    A TCP connect is not enough: the kernel accepts connections for a stopped (SIGSTOP) or
    deadlocked process, which then never answers.
    """
    import http.client

    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request("GET", "/")
        conn.getresponse().read()
        return True
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


class Launcher:
    def __init__(self, spec: Any, status_path: Path) -> None:  # spec: protocol.LaunchSpec
        self.spec = spec
        self.status_path = status_path
        self.processes: dict[str, Any] = {}   # instance name -> Popen of its (shell-wrapped) server
        self.head: Any = None   # (uvicorn server, its thread, Gym's HeadServer)
        self.entries: list[tuple[str, str, str, str]] = []
        self.restarts: dict[str, int] = {}
        self.refused_since: dict[str, float] = {}
        self.answered: dict[str, bool] = {}      # answered since its last (re)start
        self.crash_loop: dict[str, int] = {}     # restarts in a row that never answered
        self.not_before: dict[str, float] = {}   # no restart before this monotonic time
        self.state = "starting"
        self.error: str | None = None
        self.started_ray = False
        self.health: dict[str, dict[str, bool]] | None = None   # at failure, before shutdown

    # -- config ---------------------------------------------------------------------------------
    def parser_config(self) -> Any:
        from omegaconf import DictConfig

        from nemo_gym.global_config import GlobalConfigDictParserConfig

        spec = self.spec
        initial = {
            "config_paths": list(spec.config_paths),
            "policy_base_url": spec.policy_base_url,
            "policy_api_key": spec.policy_api_key or "unused",
            "policy_model_name": spec.policy_model_name,
            "head_server": dict(spec.head_server),
            "skip_venv_if_present": spec.skip_venv_if_present,
            "uv_venv_dir": spec.venv_root,
            "nemo_gym_log_dir": spec.server_log_dir,
        }
        for key in ("port_range_low", "port_range_high", "server_spinup_timeout_seconds",
                    "model_endpoint_readiness_timeout_seconds"):
            if getattr(spec, key) is not None:
                initial[key] = getattr(spec, key)
        cfg = DictConfig(initial)
        overrides = spec.overrides
        if overrides:
            from omegaconf import OmegaConf

            cfg = OmegaConf.merge(cfg, DictConfig(overrides))
        return GlobalConfigDictParserConfig(
            initial_global_config_dict=cfg,
            skip_load_from_cli=True,
            skip_load_from_dotenv=True,
        )

    # -- status ---------------------------------------------------------------------------------
    def write_status(self) -> None:
        from nemo_gym.global_config import get_global_config_dict

        out = protocol.LauncherStatus(state=self.state, error=self.error, launcher_pid=os.getpid(), time=time.time())
        try:
            gcd = get_global_config_dict()
            out.head_url = f"http://{gcd.head_server.host}:{gcd.head_server.port}"
            for name, server_type, server_name, _ in self.entries:
                cfg = gcd[name][server_type][server_name]
                process = self.processes.get(name)
                out.servers[name] = protocol.ServerState(
                    type=server_type, server=server_name, host=str(cfg.get("host")),
                    port=int(cfg.get("port")) if cfg.get("port") is not None else None,
                    pid=process.pid if process is not None else None,
                    alive=process is not None and process.poll() is None,
                    restarts=self.restarts.get(name, 0),
                    log_path=str(Path(self.spec.server_log_dir) / f"{name.replace('/', '_')}.log"),
                    at_failure=(self.health or {}).get(name),
                )
        except Exception:  # status must never take the launcher down
            pass
        out.write(self.status_path)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        from nemo_gym.global_config import get_global_config_dict

        # Resolved once and cached by Gym: the head server and every server get this very dict.
        gcd = get_global_config_dict(global_config_dict_parser_config=self.parser_config())
        self.entries = _server_entries(gcd)
        if self.spec.drop_environment_servers:
            self.drop_environment_servers(gcd)
        if not self.entries:
            raise RuntimeError("the Gym config names no server to start")
        _link_venvs(self.entries, Path(self.spec.venv_root), Path(self.spec.gym_venv))
        self.write_status()
        use_ray = self.spec.ray
        if use_ray == "auto":
            use_ray = not all(_declares_no_ray(entry) for entry in self.entries)
        if use_ray:  # else no Ray at all: seconds and a dozen processes on a small box
            self.start_ray(gcd)
        self.head = internals.start_head_server()
        for name, server_type, server_name, entrypoint in self.entries:
            print(f"[launcher] starting `{name}`", flush=True)
            self.processes[name] = internals.start_server(gcd, name, server_type, server_name, entrypoint)
        internals.publish_servers(self.head[2], gcd, self.entries, self.processes)
        self.write_status()
        self.wait_until_answering(gcd)
        internals.mark_ready(self.head[2])
        self.state = "ready"
        self.write_status()
        print("[launcher] GYM READY", flush=True)

    def wait_until_answering(self, gcd: Any) -> None:
        """Until every server answers HTTP; a server that exits first, or the spin-up timeout, fails
        the start (naming the servers)."""
        timeout = self.spec.server_spinup_timeout_seconds or DEFAULT_SPINUP_TIMEOUT_S
        deadline = time.monotonic() + timeout
        waiting = {e[0]: e for e in self.entries}
        while waiting:
            for name, (_, server_type, server_name, _) in list(waiting.items()):
                code = self.processes[name].poll()
                if code is not None:
                    raise RuntimeError(f"Gym server `{name}` exited with code {code} while starting "
                                       f"(its log: {Path(self.spec.server_log_dir) / name.replace('/', '_')}.log)")
                cfg = gcd[name][server_type][server_name]
                if _http_answers(str(cfg.host), int(cfg.port)):
                    del waiting[name]
            if waiting and time.monotonic() > deadline:
                raise RuntimeError(f"Gym servers not answering after {timeout:.0f} s: {', '.join(waiting)}")
            time.sleep(WATCH_INTERVAL_S if waiting else 0)

    def snapshot_health(self) -> None:
        """Record which servers are alive and answering, once, before anything is shut down."""
        if self.health is not None or not self.processes:
            return
        from nemo_gym.global_config import get_global_config_dict

        gcd = get_global_config_dict()
        health = {}
        for name, server_type, server_name, _ in self.entries:
            cfg = gcd[name][server_type][server_name]
            process = self.processes.get(name)
            health[name] = {
                "alive": process is not None and process.poll() is None,
                "answering": _http_answers(str(cfg.host), int(cfg.port), timeout_s=0.5),
            }
        self.health = health

    def drop_environment_servers(self, gcd: Any) -> None:
        """Remove the environment servers (legacy `/run` relays in front of each agent).

        Rollouts are posted straight to the agents, so the relays would only cost a process each,
        and they are the one shipped kind that still needs Ray.
        """
        from omegaconf import open_dict

        with open_dict(gcd):
            for name, server_type, _, _ in self.entries:
                if server_type == "environment_servers":
                    del gcd[name]
        self.entries = [e for e in self.entries if e[1] != "environment_servers"]

    def start_ray(self, gcd: Any) -> None:
        """Start a lean Ray for the servers that still use it (Gym's RunHelper would start a fat one).

        The servers find the cluster through `ray_head_node_address` in the config they are handed. Ours has no
        dashboard (a dozen processes on a 2-core box) and one CPU. ray.init also replaces the SIGTERM
        handler with one that exits mid-shutdown, so ours goes back on afterwards.
        """
        import ray
        from omegaconf import open_dict

        ray.init(
            include_dashboard=False,
            num_cpus=int(self.spec.ray_num_cpus),
            log_to_driver=False,
            ignore_reinit_error=True,
        )
        self.started_ray = True
        with open_dict(gcd):
            gcd["ray_head_node_address"] = ray.get_runtime_context().gcs_address
        _install_signal_handlers()

    def restart_server(self, name: str) -> None:
        """Start one server again with the command it was started with, on the port it had."""
        from nemo_gym.global_config import get_global_config_dict

        gcd = get_global_config_dict()
        _, server_type, server_name, entrypoint = next(e for e in self.entries if e[0] == name)
        # Whatever still runs as this server (a hung one, or a child its wrapper left behind)
        # holds the port: end it first.
        proctree.terminate(_instance_pids(internals.instance_env_var(), name), grace_s=3.0)
        old = self.processes.get(name)
        if old is not None:
            try:
                old.wait(timeout=5)
            except Exception:
                pass
        self.processes[name] = internals.start_server(gcd, name, server_type, server_name, entrypoint)
        self.restarts[name] = self.restarts.get(name, 0) + 1
        self.refused_since.pop(name, None)
        # A server that dies again before it ever answers waits longer each time (crash loop).
        crashes = 0 if self.answered.get(name, True) else self.crash_loop.get(name, 0) + 1
        self.crash_loop[name] = crashes
        self.not_before[name] = time.monotonic() + (min(2.0 ** crashes, 60.0) if crashes else 0.0)
        self.answered[name] = False
        print(f"[launcher] restarted `{name}` (restart #{self.restarts[name]})", flush=True)
        self.write_status()

    def watch_forever(self) -> None:
        from nemo_gym.global_config import get_global_config_dict

        gcd = get_global_config_dict()
        while True:
            if not self.head[1].is_alive():
                raise RuntimeError("the Gym head server thread stopped")
            for name, server_type, server_name, _ in self.entries:
                now = time.monotonic()
                process = self.processes.get(name)
                if process is None or process.poll() is not None:
                    if now >= self.not_before.get(name, 0.0):
                        code = None if process is None else process.returncode
                        print(f"[launcher] `{name}` exited (code {code})", flush=True)
                        self.restart_server(name)
                    continue
                cfg = gcd[name][server_type][server_name]
                if _http_answers(str(cfg.host), int(cfg.port)):
                    self.answered[name] = True
                    self.refused_since.pop(name, None)
                elif self.answered.get(name, True):
                    # Only a server that answered since its (re)start can be hung; one still
                    # importing its dependencies is just slow.
                    since = self.refused_since.setdefault(name, now)
                    if time.monotonic() - since > self.spec.hung_after_s:
                        print(f"[launcher] `{name}` alive but answered no HTTP request for "
                              f"{time.monotonic() - since:.0f} s (hung): restarting", flush=True)
                        self.restart_server(name)
            time.sleep(WATCH_INTERVAL_S)

    def shutdown(self) -> None:
        if self.state == "failed":
            self.snapshot_health()
        # Every server process at once, with the shells that wrap them (signalling only a wrapper
        # would leave its server running).
        pids = [p for proc in self.processes.values() for p in [proc.pid, *proctree.descendants(proc.pid)]]
        proctree.terminate(pids, grace_s=3.0)
        if self.head is not None:
            self.head[0].should_exit = True
            self.head[1].join(timeout=5)
        if self.started_ray:
            try:
                import ray

                ray.shutdown()
            except Exception:
                traceback.print_exc()
        _kill_group_members()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    spec_path = Path(argv[1]).resolve()
    spec = protocol.LaunchSpec.read(spec_path)
    # Offline machines: Ray must not try to report usage (inherited by every server process).
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    status_path = Path(spec.status_path)

    launcher = Launcher(spec, status_path)
    code = 0
    try:
        _install_signal_handlers()
        parent_pid = spec.parent_pid
        if parent_pid:
            threading.Thread(target=_watch_parent, args=(int(parent_pid),), daemon=True).start()
        launcher.start()
        launcher.watch_forever()
    except _Shutdown as stop:
        print(f"[launcher] shutting down ({stop})", flush=True)
        launcher.state = "stopped"
    except BaseException as error:  # a failed start: say why in the status file, then clean up
        traceback.print_exc()
        launcher.state = "failed"
        launcher.error = f"{type(error).__name__}: {error}"[-4000:]
        code = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        launcher.shutdown()
        if launcher.state == "ready":
            launcher.state = "stopped"
        launcher.write_status()
        print("[launcher] stopped", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
