"""JUnit XML (one test case per budget) and a Markdown summary for CI step summaries."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from kdctl.errors import distinct
from kdctl.gate.rules import Check


def junit_xml(checks: list[Check], suite: str = "kdctl.gate", classname: str = "gate") -> str:
    failures = sum(not c.passed for c in checks)
    root = ET.Element("testsuites", name="kdctl", tests=str(len(checks)), failures=str(failures), errors="0")
    ts = ET.SubElement(root, "testsuite", name=suite, tests=str(len(checks)), failures=str(failures), errors="0",
                       skipped="0")
    for c in checks:
        tc = ET.SubElement(ts, "testcase", classname=classname, name=c.name, time="0")
        if not c.passed:
            f = ET.SubElement(tc, "failure", message=c.message, type="BudgetExceeded")
            f.text = c.message
        so = ET.SubElement(tc, "system-out")
        so.text = c.message
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


_MD_SPECIAL = str.maketrans({"\\": "\\\\", "|": "\\|", "`": "\\`", "*": "\\*", "<": "&lt;", ">": "&gt;",
                              "\n": " ", "\r": " "})


def md_escape(text: object) -> str:
    """``text`` as literal Markdown: a class or folder name with ``|`` no longer splits a table row, nor ``*``,
    backticks or ``<tag>`` turn into formatting or HTML where the Markdown is rendered (a CI step summary, GitHub)."""
    return str(text).translate(_MD_SPECIAL)


def is_our_junit(head: bytes) -> bool:
    """Whether a file's first bytes are a JUnit report :func:`junit_xml` wrote (one a gate may replace)."""
    return head.startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n<testsuites name="kdctl" ')


def is_our_summary(head: bytes) -> bool:
    """Whether a file's first bytes are a gate's summary (:func:`markdown_summary` titled "kdctl gate")."""
    return any(head.startswith(f"## {mark} kdctl gate: ".encode()) for mark in ("✅", "❌"))


def markdown_summary(checks: list[Check], title: str, context: dict) -> str:
    ok = all(c.passed for c in checks)
    lines = [f"## {'✅' if ok else '❌'} {title}: {'PASS' if ok else 'FAIL'}", ""]
    lines += [f"- **{k}**: {md_escape(v)}" for k, v in context.items()] + [""]
    lines += ["| check | value | budget | result |", "|---|---:|---:|:---:|"]
    for c in checks:
        v, limit = ("missing", f"{c.budget:.4g}") if c.value is None else distinct("{:.4g}", c.value, c.budget)
        lines.append(f"| {c.name} | {v} | {limit} | {'pass' if c.passed else '**FAIL**'} |")
    lines += ["", *[f"- {c.name}: {md_escape(c.message)}" for c in checks if not c.passed]]
    return "\n".join(lines).rstrip() + "\n"
