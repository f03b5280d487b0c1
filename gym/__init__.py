"""NeMo Gym spin-up and rollout orchestration.

    from gym.config import GymConfig
    from gym.servers import GymServers
    from gym.rollouts import collect, env_metrics, load_env_rows, load_rows
    from gym.sequence import build_sequence, ContiguityError

Kept import-free so `from gym.types import ...` stays cheap (the dashboard only needs the types).
"""
