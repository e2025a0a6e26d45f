"""The lineage of a report's bundles as a graph (a bundle can have two parents: a distill bundle has its teacher
and its student): inline SVG for HTML, Mermaid for Markdown."""

from __future__ import annotations

import html

from kdctl.bundle import Bundle

COLOURS = {"train": "#dbeafe", "distill": "#dcfce7", "eval": "#f3f4f6", "export": "#fef9c3", "profile": "#ffedd5",
           "gate": "#fee2e2", "report": "#ede9fe"}


def edges(chain: list[Bundle]) -> list[tuple[str, str]]:
    ids = {b.id for b in chain}
    return [(p["id"], b.id) for b in chain for p in b.manifest.get("parents", []) if p.get("id") in ids]


def _depths(chain: list[Bundle]) -> dict[str, int]:
    depth = {b.id: 0 for b in chain}
    for _ in chain:  # longest path from a root; the chain is small
        for a, b in edges(chain):
            depth[b] = max(depth[b], depth[a] + 1)
    return depth


def mermaid(chain: list[Bundle]) -> str:
    lines = ["```mermaid", "graph LR"]
    for b in chain:
        label = f"{b.stage}: {b.path.name}"  # a folder name as Mermaid shows it literally: its entity codes
        for ch, code in (("#", "#35;"), ('"', "#quot;"), ("<", "#lt;"), (">", "#gt;")):
            label = label.replace(ch, code)
        lines.append(f'  n{b.id[:8]}["{label}"]')
    lines += [f"  n{a[:8]} --> n{b[:8]}" for a, b in edges(chain)]
    return "\n".join(lines + ["```"])


def svg(chain: list[Bundle]) -> str:
    depth = _depths(chain)
    cols: dict[int, list[Bundle]] = {}
    for b in chain:
        cols.setdefault(depth[b.id], []).append(b)
    w, h, gx, gy = 170, 44, 40, 16
    pos = {b.id: (10 + d * (w + gx), 10 + i * (h + gy)) for d, bs in cols.items() for i, b in enumerate(bs)}
    width = 20 + (max(cols) + 1) * (w + gx)
    height = 20 + max(len(v) for v in cols.values()) * (h + gy)
    out = [f'<svg class="lineage" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}"><defs><marker id="arrow" markerWidth="8" markerHeight="8" refX="7" '
           'refY="4" orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#555"/></marker></defs>']
    for a, b in edges(chain):
        (x1, y1), (x2, y2) = pos[a], pos[b]
        out.append(f'<line x1="{x1 + w}" y1="{y1 + h / 2}" x2="{x2 - 2}" y2="{y2 + h / 2}" stroke="#555" '
                   'marker-end="url(#arrow)"/>')
    for b in chain:
        x, y = pos[b.id]
        name = b.path.name if len(b.path.name) <= 22 else b.path.name[:21] + "…"
        out.append(f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="6" fill="{COLOURS.get(b.stage, "#fff")}" '
                   f'stroke="#888"/><text x="{x + 8}" y="{y + 17}" font-size="12" font-weight="bold">'
                   f'{html.escape(b.stage)}</text><text x="{x + 8}" y="{y + 34}" font-size="11">{html.escape(name)}'
                   f'</text>')
    return "".join(out) + "</svg>"
