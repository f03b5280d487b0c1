"""What the trainer and the Gym launcher exchange, as typed records. Standard library only.

gym/servers.py writes a `LaunchSpec` (spec.json) and starts gym/launcher.py in the Gym venv, which
loads this file by path, reads the spec and keeps `LauncherStatus` (status.json) up to date for
gym/servers.py to read. One definition for both sides: a renamed field fails on both at once
instead of reading as a silent default.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Gym's server types, as the dashboard names them.
KINDS = {
    "resources_servers": "resources",
    "responses_api_agents": "agent",
    "responses_api_models": "model",
    "environment_servers": "environment",
}


@dataclass
class LaunchSpec:
    """How to start one Gym run (trainer -> launcher)."""

    config_paths: list[str]                    # Gym env YAMLs
    policy_base_url: str | list[str]           # our OpenAI endpoint(s), e.g. http://127.0.0.1:8080/v1; a
                                               # list (one per rank): Gym spreads sessions over them
    policy_model_name: str
    server_log_dir: str
    venv_root: str                             # <type>/<name>/.venv symlinks to gym_venv live here
    status_path: str
    gym_venv: str
    policy_api_key: str = "unused"
    head_server: dict[str, Any] = field(default_factory=lambda: {"host": "127.0.0.1", "port": 11000})
    port_range_low: int | None = None
    port_range_high: int | None = None
    server_spinup_timeout_seconds: float | None = None
    model_endpoint_readiness_timeout_seconds: float | None = None
    skip_venv_if_present: bool = True
    overrides: dict[str, Any] = field(default_factory=dict)   # merged over the Gym config
    parent_pid: int | None = None              # the launcher ends everything when this process is gone
    hung_after_s: float = 10.0                 # no HTTP answer for this long: restart the server
    drop_environment_servers: bool = True      # rollouts go to the agents directly
    ray: bool | str = "auto"                   # "auto": only if a server still uses Ray
    ray_num_cpus: int = 1

    def write(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def read(cls, path: Path) -> "LaunchSpec":
        return cls(**json.loads(Path(path).read_text()))


@dataclass
class ServerState:
    """One Gym server as the launcher runs it."""

    type: str                      # Gym's server type, e.g. "resources_servers"
    server: str                    # Gym's server name inside that type
    host: str
    port: int | None
    pid: int | None
    alive: bool
    restarts: int                  # by the launcher: the process died or hung
    log_path: str
    at_failure: dict[str, bool] | None = None   # alive/answering when the launcher gave up


@dataclass
class LauncherStatus:
    state: str = "starting"        # starting | ready | failed | stopped
    error: str | None = None
    launcher_pid: int | None = None
    head_url: str | None = None
    servers: dict[str, ServerState] = field(default_factory=dict)
    time: float = 0.0

    def write(self, path: Path) -> None:
        """Atomically: a reader never sees half a file."""
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: Path) -> "LauncherStatus":
        """Raises OSError / ValueError when the file is missing or not a status."""
        raw: dict[str, Any] = json.loads(Path(path).read_text())
        servers = {name: ServerState(**s) for name, s in (raw.pop("servers", None) or {}).items()}
        return cls(**raw, servers=servers)


@dataclass
class ServerStatus:
    """One Gym server as the dashboard shows it."""

    name: str                 # e.g. "string_match_simple_agent" or "head"
    kind: str                 # "head" | "agent" | "resources" | "model" | "launcher"
    up: bool
    restarts: int
    log_path: str
    url: str | None = None
