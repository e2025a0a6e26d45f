"""Bounds shared by the recipe schema and the CLI options, and what this machine gives a process (a module
without heavy imports, so the CLI starts fast)."""

import os


SEED_MAX = 2**32 - 1  # NumPy's seed range; Ultralytics seeds NumPy with the training seed
IMGSZ_MAX = 4096  # the largest input side a recipe or an export/eval --imgsz may ask for


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, as in a container or under taskset), not the
    host's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def memory_size(n: float) -> str:
    """Bytes as a person reads them in an error: GB from 1 GB, else MB."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"
