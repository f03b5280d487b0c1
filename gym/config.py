"""The `gym:` section of config.yaml: which NeMo Gym environments run, and how rollouts are posted.

    gym:
      venv: .venv-gym
      concurrency: 32
      envs:
        - name: string_match
          config: string_match            # a shipped Gym config by name, or a YAML path
          train_data: resources_servers/string_match/data/example.jsonl

Unknown keys are errors that name the key; so are config and data files that do not exist.
Several environments run side by side by listing them: no code change.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

REPO_ROOT = Path(__file__).resolve().parent.parent
# Every environment's agent calls the model server named `policy_model`; this config defines it
# as Gym's vllm_model adapter pointed at our engine, returning token ids and logprobs.
POLICY_MODEL_CONFIG = "responses_api_models/vllm_model/configs/vllm_model_for_training.yaml"
_SERVER_TYPES = ("resources_servers", "responses_api_agents", "responses_api_models", "environment_servers")


class GymConfigError(ValueError):
    """A `gym:` setting that cannot work; the message names the key."""


class EnvConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    config: str                      # shipped config name ("string_match") or a YAML path
    agent: str | None = None         # agent the rows go to; default: the config's only agent
    train_data: str                  # JSONL of Gym rows
    eval_data: str | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)  # Gym global-config overrides


class GymConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    envs: list[EnvConfig] = Field(min_length=1)
    head_port: int = Field(default=11000, ge=0, le=65535)   # 0: pick a free port at start
    port_range: tuple[int, int] = (11001, 11999)
    concurrency: int = Field(default=32, ge=1)
    request_timeout_s: float = Field(default=300.0, gt=0)
    max_retries: int = Field(default=3, ge=0)
    startup_timeout_s: float = Field(default=120.0, gt=0)
    # a server that answers no HTTP request (probe deadline 2 s) for this long is hung: restarted
    hung_after_s: float = Field(default=10.0, gt=0)
    venv: str = ".venv-gym"
    overrides: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> GymConfig:
        low, high = self.port_range
        if not 0 < low < high <= 65535:
            raise GymConfigError(f"port_range: need 0 < low < high <= 65535, got {self.port_range}")
        if low <= self.head_port <= high:
            raise GymConfigError(f"head_port: {self.head_port} lies inside port_range {self.port_range}")
        names = [e.name for e in self.envs]
        for dup in sorted({n for n in names if names.count(n) > 1}):
            raise GymConfigError(f"envs: name {dup!r} is used twice")
        venv = self.venv_path()
        if not (venv / "bin" / "python").exists():
            raise GymConfigError(f"venv: no Python at {venv}/bin/python (run scripts/setup.sh)")
        root = self.gym_root()
        for i, env in enumerate(self.envs):
            key = f"envs[{i}]"
            path = resolve_env_config(env.config, root, f"{key}.config")
            agents = config_agents(path, root)
            if env.agent is None:
                if len(agents) != 1:
                    raise GymConfigError(
                        f"{key}.agent: {path.name} defines {len(agents)} agents {agents}; name one")
                env.agent = agents[0]
            elif env.agent not in agents:
                raise GymConfigError(f"{key}.agent: {env.agent!r} is not an agent of {path} (it has {agents})")
            env.config = str(path)
            env.train_data = str(resolve_data(env.train_data, root, f"{key}.train_data"))
            if env.eval_data is not None:
                env.eval_data = str(resolve_data(env.eval_data, root, f"{key}.eval_data"))
        return self

    def venv_path(self) -> Path:
        path = Path(self.venv)
        return path if path.is_absolute() else (Path.cwd() / path if (Path.cwd() / path).exists() else REPO_ROOT / path)

    def gym_root(self) -> Path:
        """The Gym venv's site-packages: where the shipped servers and their configs live."""
        found = sorted(glob.glob(str(self.venv_path() / "lib" / "python3*" / "site-packages")))
        for site in found:
            if (Path(site) / "nemo_gym").is_dir():
                return Path(site)
        raise GymConfigError(f"venv: nemo_gym is not installed in {self.venv_path()}")

    def env(self, name: str) -> EnvConfig:
        for env in self.envs:
            if env.name == name:
                return env
        raise KeyError(f"no gym env named {name!r} (have {[e.name for e in self.envs]})")

    def config_paths(self) -> list[str]:
        """Gym config_paths: every environment plus the policy model adapter."""
        paths = [e.config for e in self.envs]
        return list(dict.fromkeys(paths)) + [str(self.gym_root() / POLICY_MODEL_CONFIG)]

    def gym_overrides(self) -> dict[str, Any]:
        """Gym global-config overrides: our policy-adapter defaults, then each env's, then global."""
        merged: dict[str, Any] = {
            # Shipped rows use the Responses `developer` role; open chat templates (Qwen, SmolLM2)
            # know only `system`, and render `developer` as a turn the model never saw in training.
            "policy_model": {"responses_api_models": {"vllm_model": {"replace_developer_role_with_system": True}}},
        }
        for env in self.envs:
            _deep_merge(merged, env.overrides)
        return _deep_merge(merged, self.overrides)


def resolve_env_config(config: str, gym_root: Path, key: str = "config") -> Path:
    """A shipped config name ("string_match", "blackjack") or a YAML path -> an existing file."""
    looks_like_path = config.endswith((".yaml", ".yml")) or "/" in config
    if looks_like_path:
        for base in (Path.cwd(), REPO_ROOT, gym_root):
            candidate = Path(config) if Path(config).is_absolute() else base / config
            if candidate.is_file():
                return candidate.resolve()
        raise GymConfigError(f"{key}: no file {config!r} (looked in cwd, the repo and {gym_root})")
    preferred = gym_root / "resources_servers" / config / "configs" / f"{config}.yaml"
    if preferred.is_file():
        return preferred
    matches = sorted(p for t in _SERVER_TYPES for p in (gym_root / t).glob(f"*/configs/{config}.yaml"))
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise GymConfigError(f"{key}: {config!r} names several shipped configs {[str(m) for m in matches]}; give a path")
    raise GymConfigError(f"{key}: no shipped Gym config named {config!r} (looked for {preferred})")


def config_agents(path: Path, gym_root: Path, _seen: set[Path] | None = None) -> list[str]:
    """Agent instance names a Gym config defines, following its own `config_paths`."""
    seen = _seen if _seen is not None else set()
    if path in seen:
        return []
    seen.add(path)
    data = yaml.safe_load(path.read_text()) or {}
    agents = [k for k, v in data.items() if isinstance(v, dict) and "responses_api_agents" in v]
    for sub in data.get("config_paths") or []:
        sub_path = Path(sub) if Path(sub).is_absolute() else gym_root / sub
        if sub_path.is_file():
            agents += [a for a in config_agents(sub_path, gym_root, seen) if a not in agents]
    return agents


def resolve_data(path: str, gym_root: Path, key: str) -> Path:
    """A data path as given, else relative to the repo, else relative to the Gym install."""
    p = Path(path)
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, REPO_ROOT / p, gym_root / p]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise GymConfigError(f"{key}: no file {path!r} (looked in {[str(c.parent) for c in candidates]})")


def _deep_merge(into: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    for k, v in other.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _deep_merge(into[k], v)
        else:
            into[k] = v
    return into
