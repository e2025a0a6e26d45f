"""Jetson power sampling through ``tegrastats`` (when present): average board input power while timing."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading

# tegrastats prints rails as "NAME cur/avg" in mW, e.g. "VDD_IN 4903mW/4903mW" (JetPack 5/6) or
# "POM_5V_IN 3032/3032" (older). The board input rail is the one that counts for energy per image.
_RAIL = re.compile(r"\b(VDD_IN|POM_5V_IN|VIN_SYS_5V0)\s+(\d+)(?:mW)?/(\d+)(?:mW)?")


def parse_tegrastats_power_mw(line: str) -> float | None:
    m = _RAIL.search(line)
    return float(m.group(2)) if m else None


class PowerSampler:
    """``with PowerSampler() as p: ...`` then ``p.mean_mw`` (None when tegrastats is not available)."""

    def __init__(self, interval_ms: int = 50):
        self.interval_ms, self.samples, self.proc = interval_ms, [], None
        self.tool = shutil.which("tegrastats")

    def __enter__(self):
        if self.tool:
            self.proc = subprocess.Popen([self.tool, "--interval", str(self.interval_ms)], stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, text=True)
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            mw = parse_tegrastats_power_mw(line)
            if mw is not None:
                self.samples.append(mw)

    def __exit__(self, *exc):
        if self.proc:
            self.proc.terminate()
            self.proc.wait(timeout=5)

    @property
    def mean_mw(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None
