"""Small, shared operations on captured GraphModules: parameters, constants, dead code and shapes."""

from __future__ import annotations

import contextlib
import copy
import inspect
import warnings
from typing import Any

import optree
import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

__all__ = [
    "CASTS",
    "INSERTED",
    "STREAMED",
    "add_parameter",
    "computes_sizes_from_values",
    "constant_value",
    "copy_graph",
    "eliminate_dead_code",
    "fake_weights",
    "flat_inputs",
    "get_tensor",
    "graph_device",
    "is_diagonal",
    "is_op",
    "logits_of",
    "mutates",
    "owner_of",
    "refresh_shapes",
    "remove_unused_attributes",
    "set_tensor",
    "strip_casts",
    "tensor_meta",
    "tensor_targets",
    "unique_parameters",
    "val",
]

INSERTED = "fxslice_inserted"
"""Submodule of the GraphModule that holds every parameter fxslice adds (skip, bridge and norm matrices)."""

STREAMED = "fxslice.streamed"
"""``gm.meta`` key of the ``fxslice.streaming.WeightStore`` holding a streamed graph's weights. Its
parameters are then meta-device placeholders (shape and dtype, no data; tied weights share one), and
``get_tensor`` / ``set_tensor`` / ``add_parameter`` read and write the store instead."""

aten = torch.ops.aten

CASTS = (aten.to, aten._to_copy, aten.type_as)
"""Ops that change only a value's dtype."""


def is_op(node: Any, *packets) -> bool:
    """True when ``node`` calls one of the ATen overload packets (``aten.view`` …) or plain callables."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    target = node.target
    packet = getattr(target, "overloadpacket", target)
    return packet in packets or target in packets


def strip_casts(node: Any) -> Any:
    """The value before any dtype casts (``to``, ``_to_copy``, ``type_as``)."""
    while is_op(node, *CASTS) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def mutates(node: fx.Node) -> bool:
    """True when ``node`` calls an op that writes into one of its arguments (``copy_``, ``index_copy_`` …)."""
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    return schema is not None and schema.is_mutable


def val(node: Any):
    """The FakeTensor (or SymInt) recorded for ``node`` by export / shape propagation, else None."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def owner_of(module: torch.nn.Module, target: str) -> tuple[torch.nn.Module, str]:
    """The submodule that holds the dotted attribute ``target`` of ``module``, and the attribute's name in it."""
    path, _, name = target.rpartition(".")
    return (module.get_submodule(path) if path else module), name


def tensor_meta(gm: fx.GraphModule, target: str) -> torch.Tensor:
    """The tensor at ``target`` as the graph holds it, never read from disk: for shapes, dtypes and identity
    (a streamed graph's weights are meta placeholders here; tied weights are one object either way)."""
    return getattr(*owner_of(gm, target))


def get_tensor(gm: fx.GraphModule, target: str) -> torch.Tensor:
    """The tensor at ``target``, with its values (from the graph's ``WeightStore`` when streamed)."""
    tensor = tensor_meta(gm, target)
    store = gm.meta.get(STREAMED)
    if store is not None and isinstance(tensor, torch.Tensor) and tensor.is_meta:
        return store.get(target)
    return tensor


def graph_device(gm: fx.GraphModule) -> torch.device:
    """The device ``gm`` computes on: its store's for a streamed graph, else its first real tensor's (CPU
    if it holds none)."""
    store = gm.meta.get(STREAMED)
    if store is not None:
        return store.device
    for tensor in (*gm.parameters(), *gm.buffers()):
        if not tensor.is_meta:
            return tensor.device
    return torch.device("cpu")


def set_tensor(gm: fx.GraphModule, target: str, tensor: torch.Tensor) -> None:
    """Replace the parameter or buffer at ``target`` (keeps its kind; parameters never require grad).
    A streamed weight goes to the store, and the graph keeps its placeholder."""
    owner, name = owner_of(gm, target)
    store = gm.meta.get(STREAMED)
    old = getattr(owner, name, None)
    placeholder = None
    if store is not None and isinstance(old, torch.Tensor) and old.is_meta and not tensor.is_meta:
        placeholder = store.put(target, tensor)  # a Parameter already: tied weights stay one object
    if name in owner._buffers:
        owner._buffers[name] = tensor if placeholder is None else placeholder
    elif name in owner._parameters or not hasattr(owner, name):
        owner._parameters.pop(name, None)
        owner.register_parameter(name, placeholder if placeholder is not None
                                 else torch.nn.Parameter(tensor, requires_grad=False))
    else:  # a constant torch.export lifted out of the model code (``lifted_tensor_0``): a plain attribute
        setattr(owner, name, tensor)


def add_parameter(gm: fx.GraphModule, hint: str, tensor: torch.Tensor, before: fx.Node, buffer: bool = False) -> fx.Node:
    """Register ``tensor`` under ``fxslice_inserted.<hint>[_N]`` and return a get_attr node for it; as a
    buffer with ``buffer=True`` (an index, not a weight: parameter counts and healing leave it out)."""
    if not hasattr(gm, INSERTED):
        gm.add_submodule(INSERTED, torch.nn.Module())
    holder = getattr(gm, INSERTED)
    base = "".join(c if c.isalnum() or c == "_" else "_" for c in hint).strip("_") or "param"
    name, n = base, 1
    while hasattr(holder, name):
        n += 1
        name = f"{base}_{n}"
    store = gm.meta.get(STREAMED)
    tensor = tensor.to(graph_device(gm))  # built on the CPU (an identity, a scale) for a graph that may not be
    if buffer:
        holder.register_buffer(name, tensor)
        held = tensor
    else:
        held = torch.nn.Parameter(tensor, requires_grad=False) if store is None else store.put(f"{INSERTED}.{name}", tensor)
        holder.register_parameter(name, held)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(f"{INSERTED}.{name}")
    node.meta["val"] = held
    return node


def tensor_targets(gm: fx.GraphModule) -> list[str]:
    """The sorted ``get_attr`` targets of ``gm`` that are tensors: every tensor the graph reads."""
    targets = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    return sorted(t for t in targets if isinstance(tensor_meta(gm, t), torch.Tensor))


def is_diagonal(t: torch.Tensor) -> bool:
    """A square matrix whose entries off the diagonal are all zero (fuse_norm's unrotated bridge ``diag(γ)``)."""
    return t.dim() == 2 and t.shape[0] == t.shape[1] and torch.equal(t, torch.diag(torch.diagonal(t)))


def unique_parameters(module: torch.nn.Module) -> int:
    """Number of parameter elements, counting tensors that share storage (tied weights) once."""
    seen: set[tuple[int, int, tuple]] = set()
    total = 0
    for _, p in module.named_parameters(remove_duplicate=False):
        key = (id(p) if p.is_meta or is_fake(p) else p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape))
        if key not in seen:
            seen.add(key)
            total += p.numel()
    return total


_CONST_SAFE = {
    aten.to, aten._to_copy, aten.type_as, aten.add, aten.sub, aten.mul, aten.div, aten.neg, aten.view,
    aten.reshape, aten.unsqueeze, aten.squeeze, aten.expand, aten.clone, aten.detach, aten.alias,
    aten.lift_fresh_copy, aten.slice, aten.select, aten.t, aten.transpose, aten.permute, aten.contiguous,
    aten.sqrt, aten.rsqrt, aten.pow, aten.exp, aten.scalar_tensor, aten.tensor,
    aten.abs, aten.square, aten.reciprocal, aten.sigmoid, aten.tanh, aten.log, aten.clamp,
}
_NOT_CONST = {torch.Tag.inplace, torch.Tag.nondeterministic_seeded}


def _const_safe(target: Any) -> bool:
    """A pure op whose value on constants is a constant: the listed views and arithmetic, and any ATen op
    torch tags pointwise that neither writes in place nor draws random numbers (``softplus``, ``silu``…)."""
    if getattr(target, "overloadpacket", None) in _CONST_SAFE:
        return True
    tags = set(getattr(target, "tags", ()))
    return torch.Tag.pointwise in tags and not tags & _NOT_CONST


def constant_value(node: Any, _memo: dict | None = None) -> torch.Tensor | float | int | None:
    """Evaluate ``node`` if it depends only on parameters, buffers and literals; otherwise None."""
    if not isinstance(node, fx.Node):
        return node if isinstance(node, (int, float, bool)) or node is None else None
    memo = {} if _memo is None else _memo
    if node in memo:
        return memo[node]
    result = None
    if node.op == "get_attr":
        obj = get_tensor(node.graph.owning_module, node.target)
        result = obj.detach() if isinstance(obj, torch.Tensor) else None
    elif node.op == "call_function" and _const_safe(node.target):
        ok = True

        def fold(a):
            nonlocal ok
            if isinstance(a, fx.Node):
                v = constant_value(a, memo)
                if v is None:
                    ok = False
                return v
            return a

        args = fx.node.map_aggregate(node.args, fold)
        kwargs = fx.node.map_aggregate(node.kwargs, fold)
        if ok:
            with torch.no_grad():
                result = node.target(*args, **kwargs)
    memo[node] = result
    return result


def _keep(node: fx.Node) -> bool:
    return node.op in ("placeholder", "output", "call_module") or node.is_impure()


def copy_graph(gm: Any) -> Any:
    """A deep copy of ``gm`` (weights included), or of anything holding one. Copying a captured module's
    input and output tree specs makes torch warn that its own ``LeafSpec`` is deprecated: a warning about
    torch, not about the caller, so it is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        return copy.deepcopy(gm)


def eliminate_dead_code(gm: fx.GraphModule) -> None:
    """Remove unused pure nodes but keep guards and other call_module / impure nodes."""
    gm.graph.eliminate_dead_code(is_impure_node=_keep)


def remove_unused_attributes(gm: fx.GraphModule) -> None:
    """Drop parameters and buffers that no get_attr node reads any more (folded norm weights …)."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name not in used:
            owner, leaf = owner_of(gm, name)
            owner._parameters.pop(leaf, None)
            owner._buffers.pop(leaf, None)


def refresh_shapes(gm: fx.GraphModule) -> None:
    """Re-run fake-tensor shape propagation so every ``node.meta['val']`` matches the current weights.

    This is also the graph's shape check: a width that disagrees anywhere raises here, naming the node.
    Propagation runs at the captured example sizes (static shapes): the analysis reads only feature
    widths, which are static, and it is several times faster than symbolic propagation (which also
    fails on some meta kernels, e.g. ``baddbmm``). The graph itself stays dynamic in batch and sequence.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=_data_dependent_sizes(gm))
    with mode:
        inputs = [_concrete_like(n.meta.get("val")) for n in placeholders]
    # Shapes do not depend on autograd, and a graph may update its own weights in place (a model that
    # rescales them in forward), which autograd forbids on a leaf that requires grad.
    with fake_weights(gm, mode), torch.no_grad():
        FakeTensorProp(gm, mode=mode).propagate_dont_convert_inputs(*inputs)


def computes_sizes_from_values(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` computes a size from values (``item``, ``nonzero``): fake runs of it then need a
    shape environment for the sizes they cannot know."""
    return any("unbacked_bindings" in n.meta for n in gm.graph.nodes)


def _data_dependent_sizes(gm: fx.GraphModule) -> ShapeEnv | None:
    """The capture's shape environment where the graph computes a size from values (``item``, ``nonzero``):
    propagating again makes a new symbol for each, which torch binds to the capture's one in that
    environment. None for a graph without such sizes (propagation is then faster, without one)."""
    if not computes_sizes_from_values(gm):
        return None
    for node in gm.graph.nodes:
        value = node.meta.get("val")
        if is_fake(value) and value.fake_mode.shape_env is not None:
            return value.fake_mode.shape_env
    return ShapeEnv()


@contextlib.contextmanager
def fake_weights(gm: fx.GraphModule, mode: FakeTensorMode):
    """While open, a streamed graph's placeholders are fake tensors of ``mode`` on the store's device, so
    that shape propagation and fake runs see weights where the inputs are (nothing is read or allocated)."""
    store = gm.meta.get(STREAMED)
    swapped = []
    if store is not None:
        for module in gm.modules():
            for table in (module._parameters, module._buffers):
                for name, tensor in table.items():
                    if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                        with mode:
                            table[name] = torch.empty(tensor.shape, dtype=tensor.dtype, device=store.device)
                        swapped.append((table, name, tensor))
    try:
        yield
    finally:
        for table, name, tensor in swapped:
            table[name] = tensor


def _concrete_like(v):
    if not isinstance(v, torch.Tensor):
        return v
    shape = [s if isinstance(s, int) else int(s.node.hint) for s in v.shape]
    return torch.zeros(shape, dtype=v.dtype, device=v.device)


def flat_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """The graph's placeholder values for one call ``gm(*args, **kwargs)``."""
    signature = inspect.signature(gm.forward)
    bound = signature.bind(*args, **kwargs).arguments
    names = list(signature.parameters)
    spec = gm._in_spec
    positional = [bound[name] for name in names[: spec.child(0).num_children]]
    keywords = {key: bound[key] for key in spec.child(1).context}
    return fx_pytree.tree_flatten_spec((positional, keywords), spec)


def logits_of(output: Any) -> torch.Tensor | None:
    """The logits of a model output: ``.logits``, or the first floating tensor it holds (None without one)."""
    if hasattr(output, "logits"):
        return output.logits
    return next((leaf for leaf in optree.tree_leaves(output, none_is_leaf=False)
                 if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()), None)
