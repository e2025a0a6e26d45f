"""Jetson power sampling through ``tegrastats`` (when present): average board input power while timing."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading

# tegrastats prints rails as "NAME cur/avg" in mW: "VDD_IN 4903mW/4903mW" (JetPack 5/6) or "POM_5V_IN 3032/3032"
# (older). Where a board has a rail for its whole input (Orin Nano/NX, Xavier NX, Nano, TX2: VDD_IN or POM_5V_IN),
# that is the power per image; AGX Orin and AGX Xavier have none, so their module rails are summed, as the L4T
# power guides list them.
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*)\s+(\d+)(?:mW)?/(\d+)(?:mW)?")
INPUT_RAILS = ("VDD_IN", "POM_5V_IN")
MODULE_RAILS = {
    "AGX Orin": ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO"),
    "AGX Xavier": ("GPU", "CPU", "SOC", "CV", "VDDRQ", "SYS5V"),
}


def parse_tegrastats_power(line: str) -> tuple[float, str] | None:
    """(mW, what was measured) from one tegrastats line, or None when it has no known rail."""
    rails = {m.group(1): float(m.group(2)) for m in _RAIL.finditer(line)}
    for name in INPUT_RAILS:
        if name in rails:
            return rails[name], name
    for board, names in MODULE_RAILS.items():
        if all(n in rails for n in names):
            return sum(rails[n] for n in names), f"{board}: {'+'.join(names)}"
    return None


def parse_tegrastats_power_mw(line: str) -> float | None:
    got = parse_tegrastats_power(line)
    return got[0] if got else None


class PowerSampler:
    """``with PowerSampler() as p: ...`` then ``p.mean_mw`` (None when tegrastats is not available)."""

    def __init__(self, interval_ms: int = 50):
        self.interval_ms, self.samples, self.proc, self.rail = interval_ms, [], None, None
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
            got = parse_tegrastats_power(line)
            if got is not None:
                self.samples.append(got[0])
                self.rail = got[1]

    def __exit__(self, *exc):
        if self.proc:
            self.proc.terminate()
            self.proc.wait(timeout=5)

    @property
    def mean_mw(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None
