"""The C allocator of a CPU run: jemalloc or tcmalloc instead of glibc's malloc, preloaded.

vLLM's CPU backend is documented to run with tcmalloc preloaded (its own worker processes get it
when the wheel bundles one; our engine runs in-process, so it never does). glibc's malloc either
page-faults every large buffer afresh (with run.cpu_heap_mmap_mib) or fragments its heap; measured
on the default config (bench/bench_step_time.py --steps 4), jemalloc made a step 17% faster than
glibc with the 1 MiB threshold, for +0.1 GiB at the trainer's peak.

A library can only be preloaded when a process starts: `preload` re-executes this very command with
LD_PRELOAD set (same pid, so torchrun and accelerate see nothing), before anything is imported.
"""

from __future__ import annotations

import ctypes.util
import glob
import logging
import os
import sys

log = logging.getLogger(__name__)

# name -> the library ctypes.util.find_library looks for (Debian: libjemalloc2, libtcmalloc-minimal4)
LIBRARIES = {"jemalloc": "jemalloc", "tcmalloc": "tcmalloc_minimal"}
PACKAGES = {"jemalloc": "libjemalloc2", "tcmalloc": "libtcmalloc-minimal4"}
# Freed pages go back to the OS at once, from jemalloc's background thread (not on later allocations):
# generation and training each free what the other then allocates, and with jemalloc's default 10 s
# decay both stayed resident. bench/bench_step_time.py --steps 4: trainer peak 3.39 -> 3.25 GiB,
# step 19.4 -> 21.4 s (noise +-2 s); one arena (narenas:1) on top lowered nothing more.
JEMALLOC_CONF = "background_thread:true,dirty_decay_ms:0,muzzy_decay_ms:0"


def has_gpu() -> bool:
    """An NVIDIA device node, looked up without importing torch (this runs before any import)."""
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def preloaded(name: str) -> bool:
    return any(LIBRARIES[name] in part for part in os.environ.get("LD_PRELOAD", "").split(":"))


def preload(name: str) -> None:
    """Re-execute this process with allocator `name` preloaded; return if it already is, or if the
    library is not installed (with a warning: glibc's malloc then serves the run)."""
    if preloaded(name):
        return
    library = ctypes.util.find_library(LIBRARIES[name])
    if library is None:
        log.warning("run.cpu_allocator: %s is not installed (Debian: apt-get install %s); glibc's malloc is used",
                    name, PACKAGES[name])
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (library, env.get("LD_PRELOAD")) if p)
    if name == "jemalloc":
        env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
