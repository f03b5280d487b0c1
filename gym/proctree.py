"""Process groups and trees read from /proc. Standard library only.

Imported by the trainer side (gym/servers.py, tests) as `gym.proctree` and, by file path, by
gym/launcher.py inside the Gym venv: one copy for both.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def _stat(pid: int | str) -> list[str] | None:
    """The /proc/<pid>/stat fields after the parenthesised command (state, ppid, pgrp, ...)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def is_live(pid: int) -> bool:
    """Running and not a zombie."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def group_pids(pgid: int, exclude_self: bool = False) -> list[int]:
    """Live pids whose process group is `pgid`."""
    me = os.getpid()
    out = []
    for pid in _pids():
        fields = _stat(pid)
        if fields is not None and fields[0] != "Z" and int(fields[2]) == pgid and not (exclude_self and pid == me):
            out.append(pid)
    return out


def descendants(root: int) -> list[int]:
    """Live descendants of `root`, children before grandchildren."""
    children: dict[int, list[int]] = {}
    for pid in _pids():
        fields = _stat(pid)
        if fields is not None and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(pid)
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(0), []):
            out.append(child)
            todo.append(child)
    return out


def pids_mentioning(text: str) -> list[int]:
    """Live pids (other than this one) whose command line contains `text`."""
    found = []
    for pid in _pids():
        if pid == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if text in cmdline and is_live(pid):
            found.append(pid)
    return found


def pids_with_env(pids: list[int], key: str, value: str) -> list[int]:
    """Those of `pids` whose environment holds key=value."""
    marker = f"{key}={value}".encode()
    found = []
    for pid in pids:
        try:
            if marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.append(pid)
        except OSError:
            continue
    return found


def terminate(pids: list[int], grace_s: float) -> None:
    """SIGTERM, up to `grace_s` for them to exit, then SIGKILL whatever is left."""
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(is_live(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if is_live(pid):
            _signal(pid, signal.SIGKILL)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
