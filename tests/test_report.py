"""The report renders: HTML and Markdown written, PNGs non-empty and decodable, lineage followed."""

from __future__ import annotations

from PIL import Image
from typer.testing import CliRunner

from kdctl.cli.main import app


def test_report_renders(profile_cpu, tmp_path):
    res = CliRunner().invoke(app, ["report", str(profile_cpu), "--out", str(tmp_path / "r"), "--json"])
    assert res.exit_code == 0, res.output
    r = tmp_path / "r"
    html = (r / "report.html").read_text()
    assert "<table>" in html and "onnx-int8" in html and "Lineage: train:" in html
    md = (r / "report.md").read_text()
    assert "| profile |" in md and "![" in md
    pngs = sorted(r.glob("*.png"))
    assert {"pareto.png"} <= {p.name for p in pngs} and any(p.name.startswith("latency-") for p in pngs)
    for p in pngs:
        assert p.stat().st_size > 1000
        with Image.open(p) as im:
            im.verify()
            assert im.format == "PNG"
