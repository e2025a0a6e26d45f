"""Bundles: manifest content, verification, tamper detection, and atomic publication."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from kdctl.bundle import BundleWriter, load_bundle, verify_bundle
from kdctl.cli.main import app
from kdctl.errors import BundleError


def make(tmp_path, name="b", parents=()):
    with BundleWriter(tmp_path / name, stage="train", recipe={"name": "x"}, parents=parents) as w:
        (w.path / "weights.pt").write_bytes(b"\x00weights")
        (w.path / "logs").mkdir()
        (w.path / "logs" / "a.txt").write_text("log")
        w.add_output("weights", "weights.pt")
        w.metrics["map50_95"] = 0.5
    return w.bundle


def test_manifest_fields(tmp_path):
    b = make(tmp_path)
    m = json.loads((b.path / "manifest.json").read_text())
    assert m["stage"] == "train" and m["recipe"] == {"name": "x"} and m["metrics"]["map50_95"] == 0.5
    assert set(m["files"]) == {"weights.pt", "logs/a.txt"}
    assert m["files"]["weights.pt"]["size"] == 8 and len(m["files"]["weights.pt"]["sha256"]) == 64
    env = m["environment"]
    assert env["python"] and "torch" in env["packages"] and env["cpu"]
    assert m["outputs"]["weights"] == "weights.pt"


def test_parent_is_recorded(tmp_path):
    a = make(tmp_path, "a")
    b = make(tmp_path, "b", parents=[a])
    p = b.manifest["parents"][0]
    assert p["id"] == a.id and p["content_sha256"] == a.manifest["content_sha256"] and p["stage"] == "train"


def test_verify_ok_then_tamper_missing_extra(tmp_path):
    b = make(tmp_path)
    assert verify_bundle(b.path).ok
    (b.path / "weights.pt").write_bytes(b"\x00weightz")           # same size, different bytes
    res = verify_bundle(b.path)
    assert not res.ok and res.problems == ["weights.pt: changed (sha256 differs from manifest)"]
    (b.path / "logs" / "a.txt").unlink()
    (b.path / "intruder.bin").write_bytes(b"x")
    probs = "\n".join(verify_bundle(b.path).problems)
    assert "logs/a.txt: missing" in probs and "intruder.bin: not listed" in probs


def test_cli_verify_exit_codes(tmp_path):
    b = make(tmp_path)
    r = CliRunner().invoke(app, ["bundle", "verify", str(b.path), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["ok"] is True
    (b.path / "weights.pt").write_bytes(b"tampered!")
    r = CliRunner().invoke(app, ["bundle", "verify", str(b.path)])
    assert r.exit_code == 1 and "weights.pt" in r.output
    r = CliRunner().invoke(app, ["bundle", "show", str(b.path), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["stage"] == "train"


def test_exception_inside_writer_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with BundleWriter(tmp_path / "b", stage="train") as w:
            (w.path / "half.pt").write_bytes(b"half")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_killed_process_leaves_no_complete_looking_bundle(tmp_path):
    """A hard kill (no cleanup at all) mid-write: the final path must not exist, only a hidden partial dir."""
    code = textwrap.dedent(f"""
        import os
        from kdctl.bundle import BundleWriter
        w = BundleWriter({str(tmp_path / 'b')!r}, stage="train").__enter__()
        (w.path / "weights.pt").write_bytes(b"half")
        os._exit(9)
    """)
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    assert not (tmp_path / "b").exists()
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert len(leftovers) == 2 and leftovers[0] == ".b.lock" and leftovers[1].startswith(".b.partial-")
    with pytest.raises(BundleError, match="not a kdctl bundle"):
        load_bundle(tmp_path / leftovers[1])
    make(tmp_path)  # the next writer of the same --out takes the (released) lock and cleans the stale partial
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_overwrite_replaces_and_refuses_without_flag(tmp_path):
    make(tmp_path)
    with pytest.raises(BundleError, match="already exists"):
        make(tmp_path)
    with BundleWriter(tmp_path / "b", stage="eval", overwrite=True) as w:
        (w.path / "m.json").write_text("{}")
    assert load_bundle(tmp_path / "b").stage == "eval"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_load_errors(tmp_path):
    with pytest.raises(BundleError, match="bundle directory not found"):
        load_bundle(tmp_path / "none")
    (tmp_path / "d").mkdir()
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(tmp_path / "d")
    (tmp_path / "d" / "manifest.json").write_text("{broken")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(tmp_path / "d")
    b = make(tmp_path)
    with pytest.raises(BundleError, match="is a 'train' bundle; expected one of: export"):
        load_bundle(b.path, stages=("export",))
