"""Every use of NeMo Gym's private internals, in one place. Runs inside the Gym venv only.

gym/launcher.py loads this file by path. Gym (nemo-gym 0.7.0) has no public API to start its
servers from a library without `nemo_gym.cli.env` (RunHelper), whose import pulls pandas, scipy
and wandb (0.25 GiB held by the launcher for the whole run, against 0.09 GiB for what is used here),
and none to restart one server on its port. So the launcher does what RunHelper.start does with
Gym's own parts: the head server, each server's launch command (its venv set-up, then its
entrypoint with that venv's Python), the server list the head server publishes, its ready flag.
When an upgrade moves any of these, `missing()` names it and tests/test_gym_config.py fails
before a run would.

    .venv-gym/bin/python gym/gym_internals.py     # prints what is missing; exit 1 if anything
"""

from __future__ import annotations

import importlib
import shlex
import sys
import time
from pathlib import Path
from typing import Any

# (module, attribute) of the private functions used below
_FUNCTIONS = [
    ("nemo_gym", "_resolve_under_cwd_or_install"),
    ("nemo_gym.cli.setup_command", "get_venv_path"),
    ("nemo_gym.cli.setup_command", "run_command"),
    ("nemo_gym.cli.setup_command", "setup_env_command"),
    ("nemo_gym.global_config", "NEMO_GYM_CONFIG_DICT_ENV_VAR_NAME"),
    ("nemo_gym.global_config", "NEMO_GYM_CONFIG_PATH_ENV_VAR_NAME"),
    ("nemo_gym.global_config", "NEMO_GYM_RESERVED_TOP_LEVEL_KEYS"),
    ("nemo_gym.server_utils", "HeadServer"),
    ("nemo_gym.server_utils", "ServerInstanceDisplayConfig"),
]
# HeadServer methods used below
_HEAD_SERVER_METHODS = ["run_webserver", "set_server_instances", "mark_ready"]


def missing() -> list[str]:
    """The internals this module uses that the installed nemo_gym no longer has."""
    out = []
    for module, name in _FUNCTIONS:
        try:
            getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            out.append(f"{module}.{name}")
    try:
        from nemo_gym.server_utils import HeadServer

        out += [f"HeadServer.{m}" for m in _HEAD_SERVER_METHODS if not hasattr(HeadServer, m)]
    except ImportError:
        out += [f"HeadServer.{m}" for m in _HEAD_SERVER_METHODS]
    return out


def server_dir(server_type: str, server_name: str) -> Path:
    """A server's folder: the working directory first (a user's own server), then Gym's install."""
    from nemo_gym import _resolve_under_cwd_or_install

    return _resolve_under_cwd_or_install(
        Path(server_type, server_name),
        validator=lambda d: (d / "requirements.txt").exists() or (d / "pyproject.toml").exists())


def start_head_server() -> tuple[Any, Any, Any]:
    """Gym's head server in a thread of this process: (uvicorn server, thread, HeadServer)."""
    from nemo_gym.server_utils import HeadServer

    return HeadServer.run_webserver()


def start_server(gcd: Any, name: str, server_type: str, server_name: str, entrypoint: str) -> Any:
    """Start one server as RunHelper does: its venv set-up, then its entrypoint run by that venv's
    Python, in its folder, handed the whole config (so a restart gets the same port). The Popen."""
    from omegaconf import OmegaConf

    from nemo_gym.cli.setup_command import get_venv_path, run_command, setup_env_command
    from nemo_gym.global_config import NEMO_GYM_CONFIG_DICT_ENV_VAR_NAME, NEMO_GYM_CONFIG_PATH_ENV_VAR_NAME

    dir_path = server_dir(server_type, server_name)
    python = get_venv_path(dir_path, gcd) / "bin" / "python"
    command = f"{setup_env_command(dir_path, gcd, name)} && {shlex.quote(str(python))} {shlex.quote(entrypoint)}"
    extra_env = {NEMO_GYM_CONFIG_DICT_ENV_VAR_NAME: OmegaConf.to_yaml(gcd), NEMO_GYM_CONFIG_PATH_ENV_VAR_NAME: name}
    return run_command(command, dir_path, server_name=name, extra_env=extra_env)


def publish_servers(head: Any, gcd: Any, entries: list[tuple[str, str, str, str]], processes: dict[str, Any]) -> None:
    """The server list the head server answers at /server_instances (RunHelper's display records)."""
    from nemo_gym.server_utils import ServerInstanceDisplayConfig

    instances = []
    for name, server_type, server_name, entrypoint in entries:
        cfg = gcd[name][server_type][server_name]
        host, port = cfg.get("host"), cfg.get("port")
        instances.append(ServerInstanceDisplayConfig(
            process_name=name, server_type=server_type, name=server_name,
            dir_path=str(server_dir(server_type, server_name)), entrypoint=entrypoint, host=host, port=port,
            url=f"http://{host}:{port}" if host and port else None, pid=processes[name].pid, config_path=name,
            start_time=time.time(),
        ).model_dump(mode="json"))
    head.set_server_instances(instances)


def mark_ready(head: Any) -> None:
    head.mark_ready()


def instance_env_var() -> str:
    """The environment variable Gym sets to a server's instance name."""
    from nemo_gym.global_config import NEMO_GYM_CONFIG_PATH_ENV_VAR_NAME

    return NEMO_GYM_CONFIG_PATH_ENV_VAR_NAME


def reserved_top_level_keys() -> Any:
    from nemo_gym.global_config import NEMO_GYM_RESERVED_TOP_LEVEL_KEYS

    return NEMO_GYM_RESERVED_TOP_LEVEL_KEYS


if __name__ == "__main__":
    gone = missing()
    print("\n".join(f"missing: {m}" for m in gone) or "all NeMo Gym internals present")
    sys.exit(1 if gone else 0)
