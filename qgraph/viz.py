"""Graphviz rendering of a Graph: operators as boxes, parameters listed inside the operator that
reads them, inserted nodes green and changed nodes orange. Writes .dot always; .svg/.png
only when graphviz's `dot` program is installed."""
from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path
from typing import Iterable

from .graph import Graph
from .io import write_atomic

log = logging.getLogger(__name__)

INSERTED_COLOR = "#b7f0b1"
CHANGED_COLOR = "#ffd29b"
_SHOWN_ATTRS = ("kernel", "stride", "pad", "num_filter", "num_group", "num_hidden", "act_type",
                "pool_type", "global_pool", "scalar", "a_min", "a_max", "eps", "fix_gamma")


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _label(graph: Graph, name: str) -> str:
    lines = [name, graph.op(name)]
    attrs = graph.attrs(name)
    lines += [f"{k}={attrs[k]}" for k in _SHOWN_ATTRS if k in attrs]
    for ref in graph.inputs(name):
        if graph.is_param(ref.node):
            lines.append(f"{ref.node} {tuple(graph.params[ref.node].shape)}")
    return "\\n".join(s.replace('"', "'") for s in lines)


def to_dot(graph: Graph, inserted: Iterable[str] = (), changed: Iterable[str] = (), title: str = "") -> str:
    inserted, changed = set(inserted), set(changed)
    lines = ["digraph qgraph {", "  rankdir=TB;", '  node [shape=box, fontname="Helvetica", fontsize=10];']
    if title:
        lines.append(f"  label={_quote(title)}; labelloc=t;")
    for name in graph.nodes():
        if graph.is_param(name):
            continue
        style = []
        if graph.op(name) == "null":
            style.append("shape=ellipse")
        if name in inserted:
            style.append(f'style=filled, fillcolor="{INSERTED_COLOR}"')
        elif name in changed:
            style.append(f'style=filled, fillcolor="{CHANGED_COLOR}"')
        lines.append(f"  {_quote(name)} [label=\"{_label(graph, name)}\"{', ' if style else ''}{', '.join(style)}];")
    for src, dst, data in graph.nx.edges(data=True):
        if graph.is_param(src):
            continue
        label = f' [label="{data["index"]}"]' if data["index"] else ""
        lines.append(f"  {_quote(src)} -> {_quote(dst)}{label};")
    for i, ref in enumerate(graph.outputs):
        lines.append(f'  "output{i}" [shape=plaintext];')
        lines.append(f'  {_quote(ref.node)} -> "output{i}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def write(graph: Graph, stem, inserted=(), changed=(), formats=("svg",), title: str = "") -> list[Path]:
    """Write `stem.dot` and, if `dot` is installed, `stem.<fmt>` for each format."""
    stem = Path(stem)
    dot_path = stem.with_suffix(".dot")
    write_atomic(dot_path, to_dot(graph, inserted, changed, title))
    written = [dot_path]
    dot = shutil.which("dot")
    if dot is None:
        log.info("graphviz 'dot' not found: wrote %s only", dot_path)
        return written
    for fmt in formats:
        rendered = subprocess.run([dot, f"-T{fmt}", str(dot_path)], check=True, capture_output=True, timeout=300)
        written.append(write_atomic(stem.with_suffix(f".{fmt}"), rendered.stdout))
    return written
