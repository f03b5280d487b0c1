"""Every use of NeMo Gym's private internals, in one place. Runs inside the Gym venv only.

gym/launcher.py loads this file by path. Gym (nemo-gym 0.7.0) has no public API to restart one
server on its port or to skip its Ray start-up, so the launcher reaches into `RunHelper` and
`nemo_gym.cli.env`. When an upgrade moves any of these, `missing()` names it and
tests/test_gym_config.py fails before a run would.

    .venv-gym/bin/python gym/gym_internals.py     # prints what is missing; exit 1 if anything
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path
from typing import Any

# (module, attribute) of the private functions used below
_FUNCTIONS = [
    ("nemo_gym.cli.env", "_resolve_server_dir"),
    ("nemo_gym.cli.env", "_server_launch_command"),
    ("nemo_gym.cli.env", "initialize_ray"),
    ("nemo_gym.cli.env", "RunHelper"),
    ("nemo_gym.cli.setup_command", "run_command"),
    ("nemo_gym.global_config", "NEMO_GYM_CONFIG_DICT_ENV_VAR_NAME"),
    ("nemo_gym.global_config", "NEMO_GYM_CONFIG_PATH_ENV_VAR_NAME"),
    ("nemo_gym.global_config", "NEMO_GYM_RESERVED_TOP_LEVEL_KEYS"),
]
# instance attributes RunHelper.start sets, read here (checked in its source)
_RUNHELPER_ATTRIBUTES = ["_processes", "_head_server_thread"]


def missing() -> list[str]:
    """The internals this module uses that the installed nemo_gym no longer has."""
    out = []
    for module, name in _FUNCTIONS:
        try:
            getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            out.append(f"{module}.{name}")
    try:
        from nemo_gym.cli.env import RunHelper

        source = inspect.getsource(RunHelper)
        out += [f"RunHelper.{a}" for a in _RUNHELPER_ATTRIBUTES if f"self.{a}" not in source]
    except (ImportError, OSError, TypeError):
        out += [f"RunHelper.{a}" for a in _RUNHELPER_ATTRIBUTES]
    return out


def processes(rh: Any) -> dict[str, Any]:
    """Instance name -> the Popen of its (shell-wrapped) server process."""
    if rh is None:
        return {}
    return getattr(rh, "_processes", None) or {}


def head_server_alive(rh: Any) -> bool:
    return rh._head_server_thread.is_alive()


def server_dir(server_type: str, server_name: str) -> Path:
    from nemo_gym.cli.env import _resolve_server_dir

    return _resolve_server_dir(Path(server_type, server_name))


def skip_ray_start() -> None:
    """Make RunHelper.start skip its Ray cluster (no server here uses Ray)."""
    import nemo_gym.cli.env

    nemo_gym.cli.env.initialize_ray = lambda: None


def instance_env_var() -> str:
    """The environment variable Gym sets to a server's instance name."""
    from nemo_gym.global_config import NEMO_GYM_CONFIG_PATH_ENV_VAR_NAME

    return NEMO_GYM_CONFIG_PATH_ENV_VAR_NAME


def reserved_top_level_keys() -> Any:
    from nemo_gym.global_config import NEMO_GYM_RESERVED_TOP_LEVEL_KEYS

    return NEMO_GYM_RESERVED_TOP_LEVEL_KEYS


def relaunch(rh: Any, gcd: Any, name: str, server_type: str, server_name: str, entrypoint: str) -> Any:
    """Start one server again with the command and config RunHelper used (so on the same port);
    the new process replaces the old in RunHelper's table. Returns the new Popen."""
    from omegaconf import OmegaConf

    from nemo_gym.cli.env import _server_launch_command
    from nemo_gym.cli.setup_command import run_command
    from nemo_gym.global_config import NEMO_GYM_CONFIG_DICT_ENV_VAR_NAME, NEMO_GYM_CONFIG_PATH_ENV_VAR_NAME

    dir_path = server_dir(server_type, server_name)
    command = _server_launch_command(dir_path, gcd, name, Path(entrypoint))
    extra_env = {
        # the same config RunHelper handed out (Ray's address included), so ports stay put
        NEMO_GYM_CONFIG_DICT_ENV_VAR_NAME: OmegaConf.to_yaml(gcd),
        NEMO_GYM_CONFIG_PATH_ENV_VAR_NAME: name,
    }
    process = run_command(command, dir_path, server_name=name, extra_env=extra_env)
    rh._processes[name] = process
    return process


if __name__ == "__main__":
    gone = missing()
    print("\n".join(f"missing: {m}" for m in gone) or "all NeMo Gym internals present")
    sys.exit(1 if gone else 0)
