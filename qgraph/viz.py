"""Graphviz rendering of a Graph: operators as boxes, parameters listed inside the operator that
reads them, inserted nodes green and changed nodes orange. Each fake-quant subgraph (the nodes
sharing one FQ_TAG) is drawn as one rounded node labelled with its spec: kind, bits,
granularity, sign and, for inputs, the threshold (`detail="full"` draws every node). Writes
.dot always; .svg/.png only when graphviz's `dot` program is installed."""
from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path
from typing import Iterable

from .errors import ConfigError
from .graph import Graph
from .io import write_atomic
from .quantizer import FakeQuantSpec
from .tags import FQ_TAG, SPEC_TAG

log = logging.getLogger(__name__)

INSERTED_COLOR = "#b7f0b1"
CHANGED_COLOR = "#ffd29b"
FAKE_QUANT_COLOR = "#dcdcf8"
DETAILS = ("collapsed", "full")
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
            lines.append(f"{ref.node} {graph.param_shape(ref.node)}")
    return "\\n".join(s.replace('"', "'") for s in lines)


def _fake_quant_groups(graph: Graph) -> dict[str, str]:
    """node -> the id of the fake-quant subgraph it belongs to (operators only)."""
    return {n: graph.attrs(n)[FQ_TAG] for n in graph.nodes() if FQ_TAG in graph.attrs(n) and not graph.is_param(n)}


def _fake_quant_label(graph: Graph, group: str, members: list[str]) -> str:
    """kind, bits, granularity, sign and threshold of one fake-quant subgraph, from its spec."""
    text = next((graph.attrs(n)[SPEC_TAG] for n in members if SPEC_TAG in graph.attrs(n)), None)
    lines = [group]
    if text is None:
        lines.append(f"fake-quant ({len(members)} nodes)")
        return "\\n".join(lines)
    spec = FakeQuantSpec.from_json(text)
    sign = "int" if spec.signed else "uint"
    if spec.kind == "weight":
        domain = f" in {spec.winograd} domain" if spec.winograd else ""
        lines.append(f"fake-quant weight {sign}{spec.bits} per {spec.granularity}{domain}")
        read = dict.fromkeys(r.node for n in members for r in graph.inputs(n)
                             if graph.is_param(r.node) and FQ_TAG not in graph.attrs(r.node))
        lines += [f"{name} {graph.param_shape(name)}" for name in read]
    else:
        lines.append(f"fake-quant input {sign}{spec.bits} per tensor")
        value = graph.params.get(spec.threshold) if spec.threshold else None
        if spec.online:
            lines.append(f"T = batch {spec.stat.replace('_', ' ')} (online)")
        elif value is None or not float(value.ravel()[0]):
            lines.append("T not calibrated")
        else:
            lines.append(f"T = {float(value.ravel()[0]):.4g}")
    return "\\n".join(s.replace('"', "'") for s in lines)


def to_dot(graph: Graph, inserted: Iterable[str] = (), changed: Iterable[str] = (), title: str = "",
           detail: str = "collapsed") -> str:
    """The graph in graphviz's dot language; `detail` 'collapsed' (one node per fake-quant
    subgraph) or 'full' (every node)."""
    if detail not in DETAILS:
        raise ConfigError(f"dump detail {detail!r}: must be one of {', '.join(DETAILS)}")
    inserted, changed = set(inserted), set(changed)
    groups = _fake_quant_groups(graph) if detail == "collapsed" else {}
    members: dict[str, list[str]] = {}
    for name, group in groups.items():
        members.setdefault(group, []).append(name)
    lines = ["digraph qgraph {", "  rankdir=TB;", '  node [shape=box, fontname="Helvetica", fontsize=10];']
    if title:
        lines.append(f"  label={_quote(title)}; labelloc=t;")
    for name in graph.nodes():
        if graph.is_param(name) or name in groups:
            continue
        style = []
        if graph.op(name) == "null":
            style.append("shape=ellipse")
        if name in inserted:
            style.append(f'style=filled, fillcolor="{INSERTED_COLOR}"')
        elif name in changed:
            style.append(f'style=filled, fillcolor="{CHANGED_COLOR}"')
        lines.append(f"  {_quote(name)} [label=\"{_label(graph, name)}\"{', ' if style else ''}{', '.join(style)}];")
    for group, names in members.items():
        color = INSERTED_COLOR if inserted & set(names) else FAKE_QUANT_COLOR
        lines.append(f"  {_quote(group)} [label=\"{_fake_quant_label(graph, group, names)}\", "
                     f'style="rounded,filled", fillcolor="{color}"];')
    drawn = set()
    for src, dst, data in graph.nx.edges(data=True):
        if graph.is_param(src):
            continue
        edge = (groups.get(src, src), groups.get(dst, dst), data["index"] if src not in groups else 0)
        if edge[0] == edge[1] or edge in drawn:
            continue
        drawn.add(edge)
        # the data path (slot 0) pulls harder, so the model's chain stays straight beside its weights
        attrs = ([f'label="{edge[2]}"'] if edge[2] else []) + (["weight=8"] if data["slot"] == 0 else [])
        lines.append(f"  {_quote(edge[0])} -> {_quote(edge[1])}{' [' + ', '.join(attrs) + ']' if attrs else ''};")
    for i, ref in enumerate(graph.outputs):
        lines.append(f'  "output{i}" [shape=plaintext];')
        lines.append(f'  {_quote(groups.get(ref.node, ref.node))} -> "output{i}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def write(graph: Graph, stem, inserted=(), changed=(), formats=("svg",), title: str = "",
          detail: str = "collapsed") -> list[Path]:
    """Write `stem.dot` and, if `dot` is installed, `stem.<fmt>` for each format."""
    stem = Path(stem)
    dot_path = stem.with_suffix(".dot")
    write_atomic(dot_path, to_dot(graph, inserted, changed, title, detail))
    written = [dot_path]
    dot = shutil.which("dot")
    if dot is None:
        log.info("graphviz 'dot' not found: wrote %s only", dot_path)
        return written
    for fmt in formats:
        rendered = subprocess.run([dot, f"-T{fmt}", str(dot_path)], check=True, capture_output=True, timeout=300)
        written.append(write_atomic(stem.with_suffix(f".{fmt}"), rendered.stdout))
    return written
