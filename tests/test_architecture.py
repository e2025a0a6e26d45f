"""Layering the code promises: detector libraries only behind kdctl/detectors, heavy imports kept lazy."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "kdctl"
DETECTOR_LIBS = ("ultralytics", "torchvision.models.detection")


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names]
    return names


def test_only_detector_adapters_import_detector_libraries():
    offenders = []
    for py in sorted(PKG.rglob("*.py")):
        if py.parent.name == "detectors":
            continue
        for name in _imports(py):
            if any(name == lib or name.startswith(lib + ".") for lib in DETECTOR_LIBS):
                offenders.append(f"{py.relative_to(PKG.parent)}: {name}")
    assert not offenders, "import these through kdctl.detectors: " + "; ".join(offenders)


def test_the_check_sees_an_offender(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from ultralytics.nn.tasks import DetectionModel\n    import torchvision.models.detection\n")
    assert "ultralytics.nn.tasks" in _imports(f) and "torchvision.models.detection" in _imports(f)


def test_export_and_profile_meet_only_in_the_runtimes_registry():
    """kdctl export writes artifacts and kdctl profile times them; both open them through kdctl.runtimes, and neither
    imports the other (a device installs the profiler without the exporter's dependencies)."""
    offenders = []
    for stage, other in (("export", "kdctl.profile"), ("profile", "kdctl.export"), ("runtimes", "kdctl.export"),
                         ("runtimes", "kdctl.profile")):
        for py in sorted((PKG / stage).rglob("*.py")):
            offenders += [f"{py.relative_to(PKG.parent)}: {n}" for n in _imports(py)
                          if n == other or n.startswith(other + ".")]
    assert offenders == []
