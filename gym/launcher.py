"""Start NeMo Gym servers and keep them alive; runs INSIDE the Gym venv (Python 3.13).

    .venv-gym/bin/python -P gym/launcher.py SPEC.json

This file imports only the standard library and nemo_gym (plus what nemo_gym itself ships, such as
omegaconf and pyyaml): the trainer's own packages live in another venv with another Python.

What it does:
- builds the Gym global config from the spec (no CLI parsing, no .env file), points each server's
  venv at a symlink to this very venv (offline: Gym would otherwise `uv venv` from the network),
- drops the environment servers (`/run` relays; rollouts go straight to the agents) and starts a
  lean Ray only if a remaining server still uses Ray,
- starts everything with RunHelper (head server in this process, every server as a subprocess),
- writes `status.json` (spec["status_path"]) so the trainer sees every server, its pid, restarts,
- restarts a server whose process died, or that stopped accepting connections, on the same port,
- stops everything on SIGTERM/SIGINT, or when the process that started it is gone, and finally
  kills whatever is left in its process group (Ray daemons included).

Spec (JSON, or YAML by suffix): config_paths, policy_base_url, policy_api_key, policy_model_name,
head_server {host, port}, port_range_low/high, server_spinup_timeout_seconds,
model_endpoint_readiness_timeout_seconds, overrides (merged over the Gym config),
skip_venv_if_present (default true), gym_venv (default: this venv), venv_root, server_log_dir,
status_path (defaults beside the spec), parent_pid, drop_environment_servers (default true),
ray ("auto" | true | false), ray_num_cpus.

The trainer starts it as the leader of a new process group and ends that group; this file makes
the same guarantee from the inside, so a trainer killed with SIGKILL still leaves nothing behind.
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's folder (gym/) leads sys.path, and gym/types.py would shadow the
# stdlib `types` module for everything imported below. Drop it before any other import.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import json  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

WATCH_INTERVAL_S = 0.5
# A server whose process is alive but that has answered no HTTP request for this long is hung
# (spec["hung_after_s"] overrides it); each probe waits at most PROBE_DEADLINE_S.
HUNG_AFTER_S = 10.0
PROBE_DEADLINE_S = 2.0


class _Shutdown(BaseException):
    """Raised in the main thread by SIGTERM/SIGINT; a BaseException so RunHelper.start cleans up."""


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


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _group_members(pgid: int) -> list[int]:
    """Pids in process group `pgid` other than this process (read from /proc, stdlib only)."""
    me = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command: state ppid pgrp ...
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def _kill_group_members(grace_s: float = 3.0) -> None:
    """TERM then KILL every other process of our group (only when we lead a group of our own)."""
    pgid = os.getpgid(0)
    if pgid != os.getpid():
        return  # started without a group of our own: never signal a group we do not own
    pids = _group_members(pgid)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _group_members(pgid):
        time.sleep(0.1)
    for pid in _group_members(pgid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _descendants(root: int) -> list[int]:
    """All live descendants of `root`, from /proc (children before grandchildren)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(0), []):
            out.append(child)
            todo.append(child)
    return out


def _terminate(pids: list[int], grace_s: float) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() and not _is_zombie(p) for p in pids):
        time.sleep(0.05)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True



def _instance_pids(env_var: str, name: str) -> list[int]:
    """Processes of our group that run Gym server instance `name` (Gym sets `env_var`=name)."""
    marker = f"{env_var}={name}".encode()
    found = []
    for pid in _group_members(os.getpgid(0)):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in environ:
            found.append(pid)
    return found


def _server_entries(global_config_dict: Any) -> list[tuple[str, str, str, str]]:
    """(instance name, server type, server name, entrypoint) for every server Gym will run.

    The same walk RunHelper does: top-level key -> server type -> server name -> {entrypoint}.
    """
    from omegaconf import DictConfig

    from nemo_gym.global_config import NEMO_GYM_RESERVED_TOP_LEVEL_KEYS

    entries = []
    for top_level, value in global_config_dict.items():
        if top_level in NEMO_GYM_RESERVED_TOP_LEVEL_KEYS or not isinstance(value, DictConfig):
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
    from nemo_gym.cli.env import _resolve_server_dir

    _, server_type, server_name, entrypoint = entry
    app = _resolve_server_dir(Path(server_type, server_name)) / entrypoint
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
    def __init__(self, spec: dict, status_path: Path) -> None:
        self.spec = spec
        self.status_path = status_path
        self.rh: Any = None
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
            "config_paths": list(spec["config_paths"]),
            "policy_base_url": spec["policy_base_url"],
            "policy_api_key": spec.get("policy_api_key") or "unused",
            "policy_model_name": spec["policy_model_name"],
            "head_server": dict(spec.get("head_server") or {"host": "127.0.0.1", "port": 11000}),
            "skip_venv_if_present": bool(spec.get("skip_venv_if_present", True)),
            "uv_venv_dir": str(spec["venv_root"]),
            "nemo_gym_log_dir": str(spec["server_log_dir"]),
        }
        for key in ("port_range_low", "port_range_high", "server_spinup_timeout_seconds",
                    "model_endpoint_readiness_timeout_seconds"):
            if spec.get(key) is not None:
                initial[key] = spec[key]
        cfg = DictConfig(initial)
        overrides = spec.get("overrides") or {}
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

        servers = {}
        head = None
        try:
            gcd = get_global_config_dict()
            head = f"http://{gcd.head_server.host}:{gcd.head_server.port}"
            for name, server_type, server_name, _ in self.entries:
                cfg = gcd[name][server_type][server_name]
                process = (self.rh._processes or {}).get(name) if self.rh is not None else None
                servers[name] = {
                    "type": server_type,
                    "server": server_name,
                    "host": str(cfg.get("host")),
                    "port": int(cfg.get("port")) if cfg.get("port") is not None else None,
                    "pid": process.pid if process is not None else None,
                    "alive": process is not None and process.poll() is None,
                    "restarts": self.restarts.get(name, 0),
                    **({"at_failure": self.health[name]} if self.health and name in self.health else {}),
                    "log_path": str(Path(self.spec["server_log_dir"]) / f"{name.replace('/', '_')}.log"),
                }
        except Exception:  # status must never take the launcher down
            pass
        _write_json_atomic(self.status_path, {
            "state": self.state,
            "error": self.error,
            "launcher_pid": os.getpid(),
            "head_url": head,
            "servers": servers,
            "time": time.time(),
        })

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        from nemo_gym.cli.env import RunHelper
        from nemo_gym.global_config import get_global_config_dict

        parser_config = self.parser_config()
        # Resolved once and cached by Gym: RunHelper.start below reuses this very dict.
        gcd = get_global_config_dict(global_config_dict_parser_config=parser_config)
        self.entries = _server_entries(gcd)
        if self.spec.get("drop_environment_servers", True):
            self.drop_environment_servers(gcd)
        _link_venvs(self.entries, Path(self.spec["venv_root"]), Path(self.spec["gym_venv"]))
        self.write_status()
        use_ray = self.spec.get("ray", "auto")
        if use_ray == "auto":
            use_ray = not all(_declares_no_ray(entry) for entry in self.entries)
        if use_ray:
            self.start_ray(gcd)
        else:
            # Nothing here uses Ray: skip the cluster RunHelper would start (seconds and a dozen
            # processes on a small box).
            import nemo_gym.cli.env

            nemo_gym.cli.env.initialize_ray = lambda: None
        launcher = self

        class _RunHelper(RunHelper):
            def shutdown(self) -> None:
                # RunHelper.start shuts everything down before re-raising a failure; look first,
                # so the error can name the servers that were down rather than all of them.
                launcher.snapshot_health()
                super().shutdown()

        self.rh = _RunHelper()
        self.rh.start(parser_config)
        self.state = "ready"
        self.write_status()
        print("[launcher] GYM READY", flush=True)

    def snapshot_health(self) -> None:
        """Record which servers are alive and answering, once, before anything is shut down."""
        if self.health is not None or self.rh is None:
            return
        from nemo_gym.global_config import get_global_config_dict

        gcd = get_global_config_dict()
        health = {}
        for name, server_type, server_name, _ in self.entries:
            cfg = gcd[name][server_type][server_name]
            process = (getattr(self.rh, "_processes", None) or {}).get(name)
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
        """Start a lean Ray for the servers that still use it, before RunHelper would start a fat one.

        RunHelper.start calls Gym's initialize_ray, which skips an initialized Ray; the servers then
        find the cluster through `ray_head_node_address` in the config they are handed. Ours has no
        dashboard (a dozen processes on a 2-core box) and one CPU. ray.init also replaces the SIGTERM
        handler with one that exits mid-shutdown, so ours goes back on afterwards.
        """
        import ray
        from omegaconf import open_dict

        ray.init(
            include_dashboard=False,
            num_cpus=int(self.spec.get("ray_num_cpus", 1)),
            log_to_driver=False,
            ignore_reinit_error=True,
        )
        self.started_ray = True
        with open_dict(gcd):
            gcd["ray_head_node_address"] = ray.get_runtime_context().gcs_address
        _install_signal_handlers()

    def restart_server(self, name: str) -> None:
        """Start one server again with the command RunHelper used, on the port it had."""
        from omegaconf import OmegaConf

        from nemo_gym.cli.env import _resolve_server_dir, _server_launch_command
        from nemo_gym.cli.setup_command import run_command
        from nemo_gym.global_config import (
            NEMO_GYM_CONFIG_DICT_ENV_VAR_NAME,
            NEMO_GYM_CONFIG_PATH_ENV_VAR_NAME,
            get_global_config_dict,
        )

        gcd = get_global_config_dict()
        _, server_type, server_name, entrypoint = next(e for e in self.entries if e[0] == name)
        # Whatever still runs as this server (a hung one, or a child its wrapper left behind)
        # holds the port: end it first.
        stale = _instance_pids(NEMO_GYM_CONFIG_PATH_ENV_VAR_NAME, name)
        _terminate(stale, grace_s=3.0)
        for pid in stale:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        old = self.rh._processes.get(name)
        if old is not None:
            try:
                old.wait(timeout=5)
            except Exception:
                pass
        dir_path = _resolve_server_dir(Path(server_type, server_name))
        command = _server_launch_command(dir_path, gcd, name, Path(entrypoint))
        extra_env = {
            # The same config RunHelper handed out (Ray's address included), so ports stay put.
            NEMO_GYM_CONFIG_DICT_ENV_VAR_NAME: OmegaConf.to_yaml(gcd),
            NEMO_GYM_CONFIG_PATH_ENV_VAR_NAME: name,
        }
        self.rh._processes[name] = run_command(command, dir_path, server_name=name, extra_env=extra_env)
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
            if not self.rh._head_server_thread.is_alive():
                raise RuntimeError("the Gym head server thread stopped")
            for name, server_type, server_name, _ in self.entries:
                now = time.monotonic()
                process = self.rh._processes.get(name)
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
                    if time.monotonic() - since > float(self.spec.get("hung_after_s", HUNG_AFTER_S)):
                        print(f"[launcher] `{name}` alive but answered no HTTP request for "
                              f"{time.monotonic() - since:.0f} s (hung): restarting", flush=True)
                        self.restart_server(name)
            time.sleep(WATCH_INTERVAL_S)

    def shutdown(self) -> None:
        if self.state == "failed":
            self.snapshot_health()
        # RunHelper.shutdown signals only the bash wrappers and waits 1 s on each in turn, and the
        # servers under them never see the signal; so first end every server process at once.
        processes = dict(getattr(self.rh, "_processes", None) or {}) if self.rh is not None else {}
        pids = [p for proc in processes.values() for p in [proc.pid, *_descendants(proc.pid)]]
        _terminate(pids, grace_s=3.0)
        if self.rh is not None and getattr(self.rh, "_processes", None) is not None:
            try:
                self.rh.shutdown()
            except Exception:
                traceback.print_exc()
        if self.started_ray:
            try:
                import ray

                ray.shutdown()
            except Exception:
                traceback.print_exc()
        _kill_group_members()


def _load_spec(path: Path) -> dict:
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text)
    return json.loads(text)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    spec_path = Path(argv[1]).resolve()
    spec = _load_spec(spec_path)
    # Offline machines: Ray must not try to report usage (inherited by every server process).
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    spec.setdefault("gym_venv", sys.prefix)
    spec.setdefault("venv_root", str(spec_path.parent / "venvs"))
    spec.setdefault("server_log_dir", str(spec_path.parent / "servers"))
    status_path = Path(spec.get("status_path") or spec_path.parent / "status.json")

    launcher = Launcher(spec, status_path)
    code = 0
    try:
        _install_signal_handlers()
        parent_pid = spec.get("parent_pid")
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
