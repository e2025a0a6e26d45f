"""Run every benchmark in order (needs the quickstart bundles from `make demo`); results go to docs/benchmarks.md."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for script, *args in (("step_time.py",), ("export_latency.py",), ("profiler_accuracy.py",),
                       ("profiler_accuracy.py", "--hint", "throughput"), ("distill_families.py",)):
    print(f"== {' '.join([script, *args])}", flush=True)
    subprocess.run([sys.executable, str(HERE / script), *args], check=True)
