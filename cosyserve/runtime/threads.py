"""CPU threads: torch intra-op threads per physical core, one inter-op thread."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------ CPU


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads counted once)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            core = (topo / "core_id").read_text().strip()
            package = (topo / "physical_package_id").read_text().strip()
        except OSError:
            return max(1, len(cpus))
        cores.add((package, core))
    return max(1, len(cores))


def configure_cpu_threads(threads: int | None = None) -> str:
    """torch intra-op threads = physical cores (more only adds contention), inter-op = 1 (nothing
    in the pipeline runs independent ops in parallel)."""
    n = int(threads) if threads else physical_cores()
    torch.set_num_threads(n)
    # Only settable before the first inter-op work in the process.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    return f"cpu threads: {torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op"


# glibc mallopt parameters (malloc.h)
