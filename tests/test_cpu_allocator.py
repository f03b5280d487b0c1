"""engine/cpu_allocator.py: a CPU run's process re-executes itself with jemalloc preloaded."""

import subprocess
import sys
from pathlib import Path

from engine.cpu_allocator import JEMALLOC_CONF

ROOT = Path(__file__).resolve().parent.parent

# Prints its pid, preloads jemalloc (re-executing itself), prints its pid and whether jemalloc is
# mapped into it: the second run of the script is the re-executed process.
SCRIPT = """
import os, sys
sys.path.insert(0, {root!r})
from engine.cpu_allocator import preload
print("pid", os.getpid(), flush=True)
preload("jemalloc")
maps = open("/proc/self/maps").read()
print("jemalloc mapped" if "libjemalloc" in maps else "jemalloc not mapped", os.environ.get("MALLOC_CONF"))
print("args", sys.argv[1:])
"""


def run_script(tmp_path: Path, env_extra: dict[str, str] | None = None) -> list[str]:
    script = tmp_path / "child.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))
    env = {"PATH": "/usr/bin:/bin", **(env_extra or {})}
    p = subprocess.run([sys.executable, "-u", str(script), "a", "--b"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.splitlines()


def test_preload_re_executes_the_same_command_in_the_same_process_with_jemalloc_mapped(tmp_path):
    lines = run_script(tmp_path)
    # once before the re-exec, once after: the same pid, then only the re-executed process goes on
    assert lines[0] == lines[1] and lines[0].startswith("pid ")
    assert lines[2:] == [f"jemalloc mapped {JEMALLOC_CONF}", "args ['a', '--b']"]


def test_an_already_preloaded_allocator_is_not_preloaded_again(tmp_path):
    import ctypes.util

    lines = run_script(tmp_path, {"LD_PRELOAD": ctypes.util.find_library("jemalloc")})
    assert lines[0].startswith("pid ") and lines[1:] == ["jemalloc mapped None", "args ['a', '--b']"]
