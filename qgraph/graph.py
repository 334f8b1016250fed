"""Graph IR: MXNet Symbol JSON <-> networkx.MultiDiGraph + params, the edit verbs passes use, lint() and verify().

A node per Symbol JSON node, keyed by its unique name, with `op` ("null" for
variables), `attrs` (strings exactly as MXNet writes them) and `extra` (any
other JSON keys, kept verbatim). An edge per data dependency carries the
producer's output `index`, the consumer's input `slot` and the entry
`version` MXNet writes for mutated (auxiliary) inputs, so multi-output ops,
repeated inputs and aux states round-trip exactly. `params` maps every
parameter variable to a numpy array; variables listed in `input_names` are
the graph's data inputs. Whether a parameter is an auxiliary state is derived
from the operators (MXNet's list_auxiliary_states), never stored.

`params` and `outputs` are read-only views: every change goes through a verb
(`set_param`, `add_variable`, `add_output`, `set_outputs`, `set_input`, ...), each of
which checks that the tensors it references exist and raises GraphError naming them.
`lint()` checks the structure in pure Python; `verify()` adds MXNet's operator and
shape checks. Loading and saving files and blocks lives in qgraph.io.

A parameter's value may still be being written by a background job (fold_bn's products,
qgraph.background) when the pass that set it returns: `mark_pending` records that, reading
such a value through `params` waits for every job still writing (and raises what a failed one
raised), `param_shape`, names and membership do not wait, and copies share the record.
`settle()` waits for every pending value.

The verbs read networkx's adjacency dicts (`_node`, `_succ`, `_pred`) rather than its views:
the views cost more than the work, and a graph whose cached views were touched is a
reference cycle, left for the cyclic garbage collector, whose full collections over these
many small dicts were a third of the pass pipeline's time on large models.
"""
from __future__ import annotations

import copy as _copy
import heapq
import json
from operator import itemgetter
from concurrent.futures import Future
from types import MappingProxyType
from typing import Collection, Iterable, Iterator, Mapping, NamedTuple, Sequence

import mxnet as mx
import networkx as nx
import numpy as np

from .attrs import format_tuple
from .errors import GraphError, mxnet_error_line
from .op_check import check_node


class TensorRef(NamedTuple):
    """One output of a node: (node name, output index, entry version)."""

    node: str
    index: int = 0
    version: int = 0


def _as_ref(tensor) -> TensorRef:
    if isinstance(tensor, TensorRef):
        return tensor
    if isinstance(tensor, str):
        return TensorRef(tensor)
    return TensorRef(*tensor)


def _rewired(ref: TensorRef, drop: Collection[str], rewire: Mapping[str, TensorRef], reader: str) -> TensorRef:
    """`ref`, or what it is rewired to when its node is dropped (Graph.copy)."""
    if ref.node not in drop:
        return ref
    if ref.node not in rewire or ref.index != 0 or rewire[ref.node].node in drop:
        raise GraphError(f"{reader} reads output {ref.index} of '{ref.node}', which the copy drops "
                         "without a replacement")
    return rewire[ref.node]


_PLAIN_DOC_KEYS = frozenset(("nodes", "arg_nodes", "node_row_ptr", "heads", "attrs"))
_PLAIN_NODE_KEYS = frozenset(("op", "name", "attrs", "inputs"))


def _validation_text(doc: dict, text: str) -> str:
    """What MXNet's load_json is handed to validate a parsed document: each distinct operator
    (op, attributes, input count) and variable (attributes) once, reading fresh variables, under
    the document's own graph attributes. MXNet checks every node on its own (its attribute
    parser; the graph attributes pick its upgrade path), so a distinct node's verdict holds for
    its copies; parsing ResNet-18's whole text cost 1.9 ms of the 36 ms pass pipeline. A document
    with anything else (legacy or unknown keys, fused bodies, control dependencies, a version
    before MXNet 1.0, whose upgrade passes rewrite nodes) goes whole."""
    version = doc.get("attrs", {}).get("mxnet_version") if isinstance(doc.get("attrs"), dict) else None
    modern = (isinstance(version, list) and len(version) == 2 and isinstance(version[1], int)
              and not isinstance(version[1], bool) and version[1] >= 10000)
    if (not modern or set(doc) - _PLAIN_DOC_KEYS
            or any(set(entry) - _PLAIN_NODE_KEYS for entry in doc["nodes"])):
        return text
    nodes, heads, seen = [], [], set()
    for entry in doc["nodes"]:
        op, attrs, inputs = entry["op"], entry.get("attrs", {}), entry.get("inputs", [])
        key = (op, tuple(sorted(attrs.items())), len(inputs))  # _read_doc has checked attrs are str -> str
        if key in seen:
            continue
        seen.add(key)
        first = len(nodes)
        nodes.extend({"op": "null", "name": f"v{first + i}", "inputs": []} for i in range(len(inputs)))
        node = {"op": op, "name": f"n{len(nodes)}", "inputs": [[first + i, 0, 0] for i in range(len(inputs))]}
        if "attrs" in entry:
            node["attrs"] = attrs
        heads.append([len(nodes), 0, 0])
        nodes.append(node)
    validation = {"nodes": nodes, "arg_nodes": [i for i, n in enumerate(nodes) if n["op"] == "null"],
                  "heads": heads}
    if "attrs" in doc:
        validation["attrs"] = doc["attrs"]
    return json.dumps(validation)


class NodeBuilder:
    """Adds operator nodes to a graph named `<prefix>_<suffix>` (made unique) and carrying
    `tags` as extra attributes: the one way rewrites build the subgraphs they insert.

        node = graph.builder("conv1_weight_fq", {FQ_TAG: "conv1_weight_fq"})
        scaled = node("_div_scalar", "div", [x], scalar=0.5)   # -> TensorRef
    """

    def __init__(self, graph: "Graph", prefix: str, tags: Mapping[str, str] | None = None):
        self.graph, self.prefix, self.tags = graph, prefix, dict(tags or {})

    def __call__(self, op: str, suffix: str, inputs: Sequence = (), **attrs) -> TensorRef:
        return TensorRef(self.graph.add_node(op, f"{self.prefix}_{suffix}", inputs, {**attrs, **self.tags}))


class _PendingParams(Mapping):
    """Graph.params while background jobs write some values (or one failed): reading any of
    those waits for every job and raises what a failed one raised (Graph.settle); names,
    membership and other values neither wait nor raise."""

    def __init__(self, graph: "Graph"):
        self._graph = graph

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._graph._pending:
            self._graph.settle()
        return self._graph._params[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._graph._params)

    def __len__(self) -> int:
        return len(self._graph._params)

    def __contains__(self, name) -> bool:
        return name in self._graph._params


class Graph:
    """A Symbol graph plus its parameters; see the module docstring."""

    def __init__(self):
        self.nx = nx.MultiDiGraph()
        self._outputs: list[TensorRef] = []
        self._params: dict[str, np.ndarray] = {}
        self.input_names: list[str] = []
        self.input_shapes: dict[str, tuple] = {}
        self.json_attrs: dict = {}
        self._edits = 0          # bumped by every structural edit; keys the cached order
        self._order: tuple | None = None
        self._pending: dict[str, Future] = {}  # parameter -> the job still writing its value

    @property
    def params(self) -> Mapping[str, np.ndarray]:
        """Parameter name -> value (read-only; change values with set_param). Reading a value
        that a background job is still writing waits for it (see the module docstring)."""
        if self._pending and all(job.done() and job.exception() is None for job in self._pending.values()):
            self._pending = {}
        if self._pending:
            return _PendingParams(self)
        return MappingProxyType(self._params)

    def param_shape(self, name: str) -> tuple:
        """The shape of parameter `name`'s value, without waiting for a job writing it."""
        if name not in self._params:
            raise GraphError(f"'{name}' is not a parameter of the graph")
        return tuple(self._params[name].shape)

    def mark_pending(self, names: Iterable[str], job: Future) -> None:
        """The values of parameters `names` are being written by `job` (a Future from
        qgraph.background): reading them through `params` waits for it."""
        for name in names:
            if name not in self._params:
                raise GraphError(f"'{name}' is not a parameter of the graph")
            self._pending[name] = job

    def settle(self) -> "Graph":
        """Wait for every job still writing a parameter value; re-raise what one raised (its
        values stay pending: they were never written)."""
        jobs = set(self._pending.values())
        for job in jobs:
            job.result()
        self._pending = {}
        return self

    @property
    def outputs(self) -> tuple[TensorRef, ...]:
        """The graph's output tensors in head order (change them with add_output/set_outputs)."""
        return tuple(self._outputs)

    # ------------------------------------------------------------------ load / emit
    @classmethod
    def from_json(cls, text: str, params: dict | None = None, input_names: Sequence[str] | None = None,
                  source: str = "<symbol json>", params_source: str | None = None) -> "Graph":
        """Parse Symbol JSON. Variables without a value in `params` are inputs unless
        `input_names` is given, in which case every other variable must have a value."""
        try:
            doc = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as err:
            raise GraphError(f"{source}: not valid JSON ({err})") from None
        graph = cls()
        graph._read_doc(doc, source)
        graph._params = {} if params is None else dict(params)
        variables = [n for n in graph.nx if graph.op(n) == "null"]
        if input_names is None:
            graph.input_names = [n for n in variables if n not in graph._params]
        else:
            graph.input_names = list(input_names)
        graph.check_params(params_source or source)
        try:  # let MXNet validate ops and attributes now, not at first use
            mx.sym.load_json(_validation_text(doc, text))
        except mx.base.MXNetError as err:
            raise GraphError(f"{source}: MXNet rejects the graph: {mxnet_error_line(err)}") from None
        return graph

    def _read_doc(self, doc, source: str) -> None:
        if not isinstance(doc, dict) or not isinstance(doc.get("nodes"), list):
            raise GraphError(f"{source}: not a Symbol JSON (no 'nodes' list)")
        if not isinstance(doc.get("heads"), list) or not doc["heads"]:
            raise GraphError(f"{source}: Symbol JSON has no 'heads' (graph outputs)")
        names: list[str] = []
        # every name the JSON uses, so a renamed duplicate never takes a later node's name
        self._json_names = {e.get("name") for e in doc["nodes"] if isinstance(e, dict) and isinstance(e.get("name"), str)}
        for position, entry in enumerate(doc["nodes"]):
            name = self._read_node(entry, position, names, source)
            names.append(name)
        del self._json_names
        self._outputs = [self._read_entry(h, len(names), names, source, "heads") for h in doc["heads"]]
        self.check_ops(source)
        attrs = doc.get("attrs", {})
        self.json_attrs = _copy.deepcopy(attrs) if isinstance(attrs, dict) else {}

    def _read_node(self, entry, position: int, names: list, source: str) -> str:
        where = f"{source}: node #{position}"
        if not isinstance(entry, dict):
            raise GraphError(f"{where} is not an object")
        name, op, inputs = entry.get("name"), entry.get("op"), entry.get("inputs", [])
        if not isinstance(name, str) or not name:
            raise GraphError(f"{where} has no name")
        where = f"{source}: node '{name}'"
        if not isinstance(op, str) or not op:
            raise GraphError(f"{where} has no op")
        if name in self.nx:
            if op == "null":
                raise GraphError(f"{where}: two variables share this name")
            # Gluon names an operator after its block, so a block called twice (a shared
            # Activation) yields two nodes of one name; inputs refer to positions, so rename.
            name = self.unique_name(name, also_taken=self._json_names)
            self._json_names.add(name)
        attrs = None
        for key in ("attrs", "attr", "param"):
            if key in entry:
                attrs = entry[key]
                break
        attrs = {} if attrs is None else attrs
        if not isinstance(attrs, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in attrs.items()):
            raise GraphError(f"{where}: attrs must map strings to strings")
        if not isinstance(inputs, list):
            raise GraphError(f"{where}: inputs must be a list")
        if op == "null" and inputs:
            raise GraphError(f"{where}: a variable cannot have inputs")
        extra = {k: _copy.deepcopy(v) for k, v in entry.items()
                 if k not in ("name", "op", "inputs", "attrs", "attr", "param")}
        self.nx.add_node(name, op=op, attrs=dict(attrs), extra=extra)
        for slot, item in enumerate(inputs):
            ref = self._read_entry(item, position, names, source, f"node '{name}' inputs")
            self.nx.add_edge(ref.node, name, index=ref.index, slot=slot, version=ref.version)
        return name

    @staticmethod
    def _read_entry(item, limit: int, names: list, source: str, where: str) -> TensorRef:
        if (not isinstance(item, list) or len(item) not in (2, 3)
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in item)):
            raise GraphError(f"{source}: {where}: entry {item!r} is not [node, output, version]")
        node, index = item[0], item[1]
        version = item[2] if len(item) == 3 else 0
        if not 0 <= node < limit or index < 0 or version < 0:
            raise GraphError(f"{source}: {where}: entry {item!r} refers to no earlier node")
        if index >= 2**32 or version >= 2**32:  # MXNet reads both as 32-bit unsigned
            raise GraphError(f"{source}: {where}: entry {item!r} has an output or version beyond 2^32 - 1")
        return TensorRef(names[node], index, version)

    def check_ops(self, source: str = "graph") -> None:
        """Every operator has the inputs MXNet expects and is only read at outputs it has."""
        outputs = {}
        try:
            for name in self.nx:
                if self.op(name) == "null":
                    continue
                # fused oneDNN ops carry their body as a subgraph, which a bare probe cannot
                # build: only for them is an unknown arity accepted
                has_body = bool(self.nx._node[name]["extra"].get("subgraphs"))
                counted = check_node(name, self.op(name), self.attrs(name), self._in_degree(name),
                                     unknown_ok=has_body)
                if counted is not None:
                    outputs[name] = counted
        except GraphError as err:
            raise GraphError(f"{source}: {err}") from None
        reads = [(dst, d["index"], src) for src, targets in self.nx._succ.items()
                 for dst, keyed in targets.items() for d in keyed.values()]
        reads += [("the graph outputs", ref.index, ref.node) for ref in self._outputs]
        for reader, index, producer in reads:
            if self.op(producer) != "null" and producer not in outputs:
                continue
            limit = outputs.get(producer, 1)
            if index >= limit:
                raise GraphError(f"{source}: {reader} reads output {index} of '{producer}', which has {limit}")

    def check_params(self, source: str = "params") -> None:
        """Every non-input variable has a value; every value belongs to a variable."""
        variables = {n for n in self.nx if self.op(n) == "null"}
        for name in self.input_names:
            if name not in variables:
                raise GraphError(f"{source}: the graph has no input variable '{name}' "
                                 f"(variables without values: {sorted(variables - set(self._params))[:8]})")
        for name in sorted(variables - set(self.input_names)):
            if name not in self._params:
                users = sorted({c for c, _ in self.consumers(name)})
                raise GraphError(f"{source}: no value for parameter '{name}' (used by {users[:3]})")
        for name in sorted(self._params):
            if name not in variables:
                raise GraphError(f"{source}: has '{name}', which is not a variable of the graph")
            if name in self.input_names:
                raise GraphError(f"{source}: '{name}' is a graph input but also has a stored value")

    def to_json(self, indent: int | None = 2) -> str:
        """Symbol JSON as MXNet writes it (indented by default; `indent=None` is compact)."""
        order = self.topo_order()
        position = {name: i for i, name in enumerate(order)}
        nodes = []
        node_data, predecessors = self.nx._node, self.nx._pred
        for name in order:
            data = node_data[name]
            entry = {"op": data["op"], "name": name}
            if data["attrs"]:
                entry["attrs"] = dict(data["attrs"])
            edges = sorted((d["slot"], position[src], d["index"], d["version"])
                           for src, keyed in predecessors[name].items() for d in keyed.values())
            entry["inputs"] = [[p, i, v] for _, p, i, v in edges]
            if data["extra"]:
                entry.update(_copy.deepcopy(data["extra"]))
            nodes.append(entry)
        doc = {
            "nodes": nodes,
            "arg_nodes": [i for i, n in enumerate(order) if self.op(n) == "null"],
            "heads": [[position[r.node], r.index, r.version] for r in self._outputs],
            "attrs": _copy.deepcopy(self.json_attrs) or {"mxnet_version": ["int", 10901]},
        }
        return json.dumps(doc, indent=indent)

    def to_symbol(self):
        try:
            return mx.sym.load_json(self.to_json(indent=None))
        except mx.base.MXNetError as err:
            raise GraphError(f"MXNet rejects the graph: {mxnet_error_line(err)}") from None

    def aux_names(self, symbol=None) -> set:
        symbol = self.to_symbol() if symbol is None else symbol
        return set(symbol.list_auxiliary_states())

    def copy(self, drop: Collection[str] = (), rewire: Mapping[str, TensorRef] | None = None) -> "Graph":
        """A copy of the graph; without the nodes in `drop` when given, each reader (or graph
        output) of output 0 of a dropped node reading `rewire[node]` instead: what removing them
        from a copy gives, without copying them first."""
        rewire = rewire or {}
        other = Graph()
        other.nx.graph.update(self.nx.graph)
        # built on networkx's adjacency dicts as MultiDiGraph.copy() builds them (successor order,
        # one key dict shared by _succ[u][v] and _pred[v][u]), at a third of its cost
        nodes, successors, predecessors = other.nx._node, other.nx._succ, other.nx._pred
        for name, data in self.nx._node.items():
            if drop and name in drop:
                continue
            nodes[name] = {**data, "attrs": dict(data["attrs"]),
                           "extra": _copy.deepcopy(data["extra"]) if data["extra"] else {}}
            successors[name], predecessors[name] = {}, {}
        if drop:
            self._copy_edges_rewired(other, drop, rewire)
        else:
            for src, targets in self.nx._succ.items():
                out = successors[src]
                for dst, keyed in targets.items():
                    out[dst] = predecessors[dst][src] = {key: dict(d) for key, d in keyed.items()}
        other._outputs = list(self._outputs)
        other._params = dict(self._params)  # arrays are replaced by set_param, never mutated in place
        other.input_names = list(self.input_names)
        other.input_shapes = dict(self.input_shapes)
        other.json_attrs = _copy.deepcopy(self.json_attrs)
        if drop:
            other._outputs = [_rewired(ref, drop, rewire, "the graph outputs") for ref in other._outputs]
            other._params = {k: v for k, v in other._params.items() if k not in drop}
        else:
            other._edits, other._order = self._edits, self._order
        other._pending = {k: job for k, job in self._pending.items() if k in other._params}
        return other

    def _copy_edges_rewired(self, other: "Graph", drop: Collection[str], rewire: Mapping[str, TensorRef]) -> None:
        successors, predecessors = other.nx._succ, other.nx._pred
        for src, targets in self.nx._succ.items():
            for dst, keyed in targets.items():
                if dst in drop:
                    continue
                for data in keyed.values():
                    ref = _rewired(TensorRef(src, data["index"], data["version"]), drop, rewire, f"'{dst}'")
                    edges = successors[ref.node].get(dst)
                    if edges is None:
                        edges = successors[ref.node][dst] = predecessors[dst][ref.node] = {}
                    key = len(edges)
                    while key in edges:
                        key += 1
                    edges[key] = {"index": ref.index, "slot": data["slot"], "version": ref.version}

    # ------------------------------------------------------------------ queries
    def __contains__(self, name) -> bool:
        return name in self.nx

    def __len__(self) -> int:
        return self.nx.number_of_nodes()

    def op(self, name: str) -> str:
        return self.nx._node[name]["op"]

    def attrs(self, name: str) -> dict:
        """The node's attributes (read-only by convention; use set_attr to change)."""
        return self.nx._node[name]["attrs"]

    def nodes(self, op: str | Iterable[str] | None = None) -> list[str]:
        """Node names in topological order, optionally only those with the given op(s)."""
        order = self.topo_order()
        if op is None:
            return order
        ops = {op} if isinstance(op, str) else set(op)
        return [n for n in order if self.op(n) in ops]

    def is_param(self, name: str) -> bool:
        return name in self._params

    def topo_order(self) -> list[str]:
        """Node names in topological order, ties broken by insertion order (so an unedited graph
        keeps its JSON order). Cached until the next structural edit (lint() sorts afresh, for
        edits made behind the verbs' back)."""
        key = self._order_key()
        if self._order is None or self._order[0] != key:
            self._order = (key, self._sorted())
        return list(self._order[1])

    def _order_key(self) -> tuple:
        return self._edits, self.nx.number_of_nodes()

    def _sorted(self) -> list[str]:
        rank = {name: i for i, name in enumerate(self.nx)}
        pending = {name: sum(map(len, incoming.values())) for name, incoming in self.nx._pred.items()}
        ready = [(rank[n], n) for n, degree in pending.items() if degree == 0]
        heapq.heapify(ready)
        order = []
        successors = self.nx._succ
        while ready:
            _, name = heapq.heappop(ready)
            order.append(name)
            for dst, edges in successors[name].items():
                pending[dst] -= len(edges)
                if pending[dst] == 0:
                    heapq.heappush(ready, (rank[dst], dst))
        if len(order) != len(rank):
            cycle = nx.find_cycle(self.nx.subgraph([n for n in rank if pending[n] > 0]))
            raise GraphError(f"graph has a cycle through {[edge[0] for edge in cycle]}")
        return order

    def _in_degree(self, name: str) -> int:
        return sum(len(keyed) for keyed in self.nx._pred[name].values())

    def inputs(self, name: str) -> list[TensorRef]:
        """The tensors feeding `name`, ordered by input slot."""
        self._need(name)
        # networkx's edge views cost more than the sort; the adjacency dicts are read directly
        edges = [(d["slot"], TensorRef(src, d["index"], d["version"]))
                 for src, keyed in self.nx._pred[name].items() for d in keyed.values()]
        if len(edges) > 1:
            edges.sort(key=itemgetter(0))
        return [ref for _, ref in edges]

    def consumers(self, tensor) -> list[tuple[str, int]]:
        """(consumer, slot) pairs reading `tensor` (a node name means its output 0)."""
        ref = _as_ref(tensor)
        self._need(ref.node)
        return sorted((dst, d["slot"]) for dst, keyed in self.nx._succ[ref.node].items()
                      for d in keyed.values() if d["index"] == ref.index)

    def is_graph_output(self, tensor) -> bool:
        ref = _as_ref(tensor)
        return any(o.node == ref.node and o.index == ref.index for o in self._outputs)

    def match_chain(self, ops: Sequence) -> list[list[str]]:
        """Chains n0 -> n1 -> ... where n[i].op is in ops[i] (a str or a set) and
        n[i]'s output 0 feeds n[i+1]'s data slot 0. Exclusivity is the caller's check."""
        wanted = [{o} if isinstance(o, str) else set(o) for o in ops]
        chains = [[n] for n in self.nodes() if self.op(n) in wanted[0]]
        for allowed in wanted[1:]:
            chains = [chain + [dst] for chain in chains for dst, slot in self.consumers(chain[-1])
                      if slot == 0 and self.op(dst) in allowed]
        return chains

    def aux_names(self, symbol=None) -> set:
        symbol = self.to_symbol() if symbol is None else symbol
        return set(symbol.list_auxiliary_states())

    def _need(self, name: str, role: str = "node") -> None:
        if name not in self.nx:
            raise GraphError(f"{role} '{name}' does not exist in the graph")

    # ------------------------------------------------------------------ edit verbs
    def builder(self, prefix: str, tags: Mapping[str, str] | None = None) -> NodeBuilder:
        """A NodeBuilder adding nodes named `<prefix>_<suffix>` that carry `tags`."""
        return NodeBuilder(self, prefix, tags)

    def unique_name(self, base: str, also_taken=frozenset()) -> str:
        """`base`, or `base_N` with the smallest N that no node (nor `also_taken`) uses."""
        if base not in self.nx and base not in also_taken:
            return base
        i = 1
        while f"{base}_{i}" in self.nx or f"{base}_{i}" in also_taken:
            i += 1
        return f"{base}_{i}"

    def add_variable(self, name: str, value: np.ndarray | None = None, attrs: dict | None = None) -> str:
        """A new variable; with a value it is a parameter, otherwise a graph input."""
        name = self.unique_name(name)
        attrs = dict(attrs or {})
        if value is not None:
            value = np.asarray(value)
            # MXNet cannot infer a parameter's shape backwards through broadcast ops
            attrs.setdefault("__shape__", format_tuple(value.shape))
        self.nx.add_node(name, op="null", attrs=attrs, extra={})
        self._edits += 1
        if value is None:
            self.input_names.append(name)
        else:
            self._params[name] = value
        return name

    def set_param(self, name: str, value: np.ndarray) -> str:
        """Replace the value of parameter `name` (a `__shape__` attribute follows the new shape)."""
        if name not in self._params:
            self._need(name, "parameter")
            raise GraphError(f"'{name}' is not a parameter of the graph (it is a {self.op(name)} node)")
        value = np.asarray(value)
        self._params[name] = value
        self._pending.pop(name, None)
        if "__shape__" in self.attrs(name):
            self.set_attr(name, "__shape__", format_tuple(value.shape))
        return name

    def set_params(self, values: Mapping[str, np.ndarray]) -> "Graph":
        """set_param for every (name, value) in `values`."""
        for name, value in values.items():
            self.set_param(name, value)
        return self

    def add_node(self, op: str, name: str, inputs: Sequence, attrs: dict | None = None) -> str:
        """A new operator node reading `inputs` (tensors or node names) in slot order."""
        refs = [_as_ref(t) for t in inputs]
        for ref in refs:
            if ref.node not in self.nx:
                raise GraphError(f"cannot add '{name}': input node '{ref.node}' does not exist")
        name = self.unique_name(name)
        # straight into networkx's adjacency dicts, as copy() builds them (a fresh node's edge
        # keys from one source are 0, 1, ...): add_node/add_edge cost twice as much, and
        # rewrites add four nodes for each one loaded
        successors, predecessors = self.nx._succ, self.nx._pred
        self.nx._node[name] = {"op": op, "attrs": {k: str(v) for k, v in (attrs or {}).items()}, "extra": {}}
        incoming: dict = {}
        successors[name], predecessors[name] = {}, incoming
        for slot, ref in enumerate(refs):
            keyed = incoming.get(ref.node)
            if keyed is None:
                keyed = incoming[ref.node] = successors[ref.node][name] = {}
            keyed[len(keyed)] = {"index": ref.index, "slot": slot, "version": ref.version}
        self._edits += 1
        return name

    def set_attr(self, name: str, key: str, value) -> None:
        self._need(name)
        self.nx._node[name]["attrs"][key] = str(value)

    def set_input(self, name: str, slot: int, tensor) -> None:
        """Make slot `slot` of `name` read `tensor` instead of what it reads now."""
        ref = _as_ref(tensor)
        self._need(name)
        self._need(ref.node, "input tensor")
        doomed = [(src, key) for src, keyed in self.nx._pred[name].items() for key, d in keyed.items()
                  if d["slot"] == slot]
        if not doomed:
            raise GraphError(f"node '{name}' has no input in slot {slot}")
        for src, key in doomed:
            self.nx.remove_edge(src, name, key)
        self.nx.add_edge(ref.node, name, index=ref.index, slot=slot, version=ref.version)
        self._edits += 1

    def add_input(self, name: str, tensor) -> int:
        """Append `tensor` as the next input slot of `name` (e.g. a bias); returns the slot."""
        ref = _as_ref(tensor)
        self._need(name)
        self._need(ref.node, "input tensor")
        slot = self._in_degree(name)
        self.nx.add_edge(ref.node, name, index=ref.index, slot=slot, version=ref.version)
        self._edits += 1
        return slot

    def add_output(self, tensor) -> TensorRef:
        """Append `tensor` to the graph outputs (after the model's own)."""
        ref = _as_ref(tensor)
        self._need(ref.node, "output tensor")
        self._outputs.append(ref)
        return ref

    def set_outputs(self, tensors: Sequence) -> "Graph":
        """Replace the graph outputs."""
        refs = [_as_ref(t) for t in tensors]
        for ref in refs:
            self._need(ref.node, "output tensor")
        self._outputs = refs
        return self

    def insert_on_edge(self, consumer: str, slot: int, op: str, name: str,
                       attrs: dict | None = None, extra_inputs: Sequence = ()) -> str:
        """consumer[slot] <- t   becomes   consumer[slot] <- new(t, *extra_inputs). Returns new."""
        inputs = self.inputs(consumer)
        if not 0 <= slot < len(inputs):
            raise GraphError(f"node '{consumer}' has no input in slot {slot}")
        new = self.add_node(op, name, [inputs[slot], *extra_inputs], attrs)
        self.set_input(consumer, slot, TensorRef(new))
        return new

    def replace_all_uses(self, old, new) -> None:
        """Every consumer and graph output of tensor `old` reads tensor `new` instead."""
        old, new = _as_ref(old), _as_ref(new)
        self._need(old.node)
        self._need(new.node, "replacement tensor")
        for dst, slot in self.consumers(old):
            self.set_input(dst, slot, new)
        self._outputs = [new if (o.node, o.index) == (old.node, old.index) else o for o in self._outputs]

    def replace_node(self, old: str, new: str) -> None:
        """Every use of output i of `old` reads output i of `new`; `old` and its dead inputs go."""
        self._need(old)
        self._need(new, "replacement node")
        indices = {d["index"] for keyed in self.nx._succ[old].values() for d in keyed.values()}
        indices |= {o.index for o in self._outputs if o.node == old}
        for index in sorted(indices):
            self.replace_all_uses(TensorRef(old, index), TensorRef(new, index))
        self.remove_node(old)
        self.cleanup()

    def remove_node(self, name: str) -> None:
        """Remove a node nobody reads; a variable's value goes with it."""
        self._need(name)
        users = sorted(self.nx._succ[name])
        if users or any(o.node == name for o in self._outputs):
            raise GraphError(f"cannot remove '{name}': still read by {users or ['the graph outputs']}")
        self.nx.remove_node(name)
        self._edits += 1
        self._params.pop(name, None)
        self._pending.pop(name, None)
        if name in self.input_names:
            self.input_names.remove(name)

    def cleanup(self) -> "Graph":
        """Drop every node the outputs do not depend on (keeps graph inputs)."""
        live = {ref.node for ref in self._outputs}
        frontier, predecessors = list(live), self.nx._pred
        while frontier:
            for src in predecessors[frontier.pop()]:
                if src not in live:
                    live.add(src)
                    frontier.append(src)
        for name in [n for n in self.nx if n not in live and n not in self.input_names]:
            self.nx.remove_node(name)
            self._params.pop(name, None)
            self._pending.pop(name, None)
        self._edits += 1
        return self

    # ------------------------------------------------------------------ checks
    def infer_shapes(self, input_shapes: dict | None = None) -> dict[str, tuple]:
        """Shapes of every argument and auxiliary state, inferred from the input shapes."""
        shapes = dict(self.input_shapes if input_shapes is None else input_shapes)
        symbol = self.to_symbol()
        try:
            arg_shapes, _, aux_shapes = symbol.infer_shape(**shapes)
        except mx.base.MXNetError as err:
            raise GraphError(f"shape inference failed with inputs {shapes}: {mxnet_error_line(err)}") from None
        if arg_shapes is None:
            raise GraphError(f"shape inference is incomplete with inputs {shapes}")
        names = symbol.list_arguments() + symbol.list_auxiliary_states()
        return dict(zip(names, [tuple(s) for s in arg_shapes + aux_shapes]))

    def lint(self) -> "Graph":
        """Structure only, in pure Python (no MXNet): acyclic, every edge's ends exist, every
        node's input slots are 0..n-1 once each, variables have no inputs and are read at
        output 0, outputs exist, and parameters and inputs are variables (every variable
        is one or the other, never both). Raises GraphError naming the node, returns self."""
        order = self._sorted()  # afresh: the structure may have been changed behind the verbs' back
        self._order = (self._order_key(), order)
        node_data, predecessors = self.nx._node, self.nx._pred
        opless = next((name for name, data in node_data.items() if "op" not in data), None)
        if opless is not None:
            raise GraphError(f"node '{opless}' was created without an op (an edge to a missing node?)")
        for name, incoming in predecessors.items():
            if not incoming:
                continue
            if node_data[name]["op"] == "null":
                raise GraphError(f"variable '{name}' has inputs")
            slots = []
            for src, keyed in incoming.items():
                for d in keyed.values():
                    slots.append(d["slot"])
                    if d["index"] and node_data[src]["op"] == "null":
                        raise GraphError(f"node '{name}' reads output {d['index']} of variable '{src}', "
                                         "which has one")
            if len(slots) > 1:
                slots.sort()
            if slots != list(range(len(slots))):
                raise GraphError(f"node '{name}': input slots {slots} are not 0..{len(slots) - 1} once each")
        if not self._outputs:
            raise GraphError("graph has no outputs")
        for ref in self._outputs:
            if ref.node not in self.nx:
                raise GraphError(f"graph output '{ref.node}' is not a node")
        self.check_params("graph")
        return self

    def verify(self) -> "Graph":
        """lint(), then MXNet's view: every operator has the inputs MXNet expects and is read
        only at outputs it has, and, when the input shapes are known, every parameter has the
        inferred shape. Raises GraphError, returns self."""
        self.lint()
        self.check_ops()
        symbol = self.to_symbol()
        if self.input_shapes:
            inferred = self.infer_shapes()
            for name, value in self._params.items():
                if inferred.get(name) != tuple(value.shape):
                    users = sorted({c for c, _ in self.consumers(name)})
                    raise GraphError(f"parameter '{name}' has shape {tuple(value.shape)} but "
                                     f"{users[:2]} needs {inferred.get(name)}")
        n_outputs = len(symbol.list_outputs())
        if n_outputs != len(self._outputs):
            raise GraphError(f"graph declares {len(self._outputs)} outputs but MXNet sees {n_outputs}")
        return self
