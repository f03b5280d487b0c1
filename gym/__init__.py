"""NeMo Gym spin-up and rollout orchestration.

    from gym.config import GymConfig
    from gym.servers import GymServers
    from gym.rollouts import collect, env_metrics, load_env_rows, load_rows
    from gym.sequence import build_sequence, ContiguityError

Kept import-free so `from gym.protocol import ServerStatus` stays cheap (the dashboard needs only that).
`proctree.py` and `protocol.py` are standard-library only: gym/launcher.py loads them inside the Gym venv.
"""
