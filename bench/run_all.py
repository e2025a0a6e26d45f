"""Run every benchmark in order (needs the quickstart bundles from `make demo`); results go to docs/benchmarks.md."""

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
argparse.ArgumentParser(description=__doc__).parse_args()  # --help says what this runs instead of running it
for script, *args in (("step_time.py",), ("export_latency.py",), ("profiler_accuracy.py",),
                       ("profiler_accuracy.py", "--hint", "throughput"), ("distill_families.py",)):
    print(f"== {' '.join([script, *args])}", flush=True)
    subprocess.run([sys.executable, str(HERE / script), *args], check=True)
