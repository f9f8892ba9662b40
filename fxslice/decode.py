"""KV-cache decoding through a second captured graph that shares the compressed model's weights.

The decoding graph is the same architecture captured with a static KV cache (``transformers.StaticCache``
held in buffers the graph updates in place): ``(input_ids [B, T], attention_mask [B, past + T],
position_ids [B, T], cache_position [T]) -> logits``. The sequence length is dynamic, so the prompt is
prefilled in one call and each generated token is one call with ``T = 1``. Layers that keep recurrent
states (short convolutions, linear attention, state-space mixers) branch on a one-token input and mask
padding with the last ``T`` positions of the mask; their models get a graph captured for ``T = 1``
(``ONE_TOKEN``), which ``run_decoder`` feeds a prompt a token at a time. The compressed model's plan is
replayed on it (``fxslice.replay``) and then every weight is the *same tensor* as in the compressed model,
so it costs no memory but the cache. It is built on the first ``generate`` call for each batch size.

Each step reads the whole cache, so copies of it cost more per token than in a prefill: the decoding
graph is then streamlined (``streamline``) so that attention reads the cached keys and values of each
KV head once instead of a copy repeated for every query head that shares it, and casts to the dtype a
value already has are dropped. Neither is in the saved graph, so saved models are unaffected.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import optree
import torch
import torch.fx as fx
from torch.export import Dim
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .capture import HF_PREFIX, capture, example_like, export_graph
from .errors import CaptureError
from .graph import aten, eliminate_dead_code, get_tensor, is_op, mutates, set_tensor, tensor_targets, val
from .loading import empty_causal_lm, match_buffer_dtypes
from .plan import plan_of
from .replay import replay

__all__ = ["ONE_TOKEN", "Session", "build_decoder", "build_reshaped", "cache_length", "logit_error", "run_decoder",
           "streamline"]

ONE_TOKEN = "fxslice.one_token"
"""``gm.meta`` key: the decoding graph was captured for one token per call (``run_decoder`` loops)."""


class _CachedCausalLMCall(torch.nn.Module):
    """``model(...)`` with a static KV cache whose tensors are this module's buffers."""

    def __init__(self, model: torch.nn.Module, batch_size: int, max_cache_len: int, positions: bool = True):
        super().__init__()
        from transformers import StaticCache
        from transformers.cache_utils import Cache

        self.model = model  # the same attribute name as the prefill capture, so weights share names
        self.max_cache_len = max_cache_len
        self.positions = positions
        config = model.config.get_text_config()
        self.cache = StaticCache(config=config, max_cache_len=max_cache_len)
        # A sliding-window layer keeps its fill level in a Python int, which a captured graph bakes in as
        # a constant (and a model may compute positions from it); a full-length layer keeps it in a tensor.
        # The model's mask still limits what each position sees to the window (it compares absolute
        # positions), so a full layer gives the same attention; it costs cache memory beyond the window.
        self.cache.layers = [full_length_layer(layer, max_cache_len) or layer for layer in self.cache.layers]
        # transformers renamed ``past_key_values`` to ``cache``; pass it under the name this model takes.
        self.cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        # One token through the model allocates every layer's cache in the shapes its attention really
        # writes (keys and values may differ in width, as in latent attention); then they become buffers.
        unset = [(module, name) for module in model.modules() for name, value in vars(module).items() if value is None]
        first = {"input_ids": torch.zeros(batch_size, 1, dtype=torch.long, device=model.device), "use_cache": True}
        with torch.no_grad():
            try:
                model(**first, **{self.cache_argument: self.cache})
            except Exception as refused:
                # A model that takes only a cache of its own class, not a transformers Cache, makes one
                # itself: hold that one. A model whose own cache is a transformers Cache failed for
                # another reason, which is raised as it is.
                out = model(**first)
                own = next((v for v in out.values() if v is not None and not isinstance(v, (torch.Tensor, tuple))), None)
                if own is None or isinstance(own, Cache):
                    raise refused
                self.cache = own
        self.cached = []  # (layer index, attribute, key or None, buffer name) of every cache layer's tensor
        for i, layer in enumerate(getattr(self.cache, "layers", ())):
            for name, value in vars(layer).items():
                # Tensors, or dicts of them (the convolution and recurrent states of linear-attention layers)
                held = value.items() if isinstance(value, dict) else [(None, value)]
                for key, tensor in held:
                    if isinstance(tensor, torch.Tensor):
                        buffer = f"cache_{i}_{name}" + ("" if key is None else f"_{key}")
                        self.register_buffer(buffer, tensor.zero_(), persistent=False)
                        self.cached.append((i, name, key, buffer))
        # Recurrent states held elsewhere: in a cache of the model's own class, or in its modules' plain
        # attributes (``self.conv_state = ...``, None until a cached call sets them). Their tensors become
        # buffers too, read and written back on every call.
        self.held = []  # (owner, attribute, tree structure, buffer names)
        owners = [(module, name) for module, name in unset if getattr(module, name, None) is not None]
        if not hasattr(self.cache, "layers"):
            owners += [(self.cache, name) for name in vars(self.cache)]
        for owner, name in owners:
            leaves, spec = optree.tree_flatten(getattr(owner, name))
            if leaves and all(isinstance(leaf, torch.Tensor) for leaf in leaves):
                buffers = [f"cache_held_{len(self.held)}_{name}_{j}" for j in range(len(leaves))]
                for buffer, leaf in zip(buffers, leaves):
                    self.register_buffer(buffer, leaf.zero_(), persistent=False)
                self.held.append((owner, name, spec, buffers))
        # Without a key/value cache (every cached tensor a recurrent or convolution state) nothing attends over
        # past positions: such models read the mask as the current tokens' padding (``hidden * mask``).
        self.recurrent_only = all(key is not None for _, _, key, buffer in self.cached if getattr(self, buffer).dim() > 0)

    def forward(self, input_ids, attention_mask, position_ids, cache_position):
        # Point the cache at this module's buffers on every call: export swaps buffers for fakes, and the
        # graph must update the buffers, not tensors captured as constants. A new prompt (position 0)
        # rewinds fill levels and starts recurrent states from zeros: one graph serves every prompt.
        start = (cache_position[0] > 0)
        for i, name, key, buffer in self.cached:
            value = getattr(self, buffer)
            if key is None:
                setattr(self.cache.layers[i], name, value)
            else:
                getattr(self.cache.layers[i], name)[key] = value
            if value.dim() == 0 and not value.is_floating_point():  # a fill level (keys, an indexer's keys)
                value.copy_(cache_position[0])
            elif key is not None:  # a recurrent or convolution state
                value.mul_(start.to(value.dtype))
        for owner, name, spec, buffers in self.held:
            values = [getattr(self, buffer) for buffer in buffers]
            for value in values:
                if value.is_floating_point():  # a state
                    value.mul_(start.to(value.dtype))
                else:  # a position counter
                    value.copy_(cache_position[0])
            setattr(owner, name, optree.tree_unflatten(spec, values))
        if self.recurrent_only:
            attention_mask = attention_mask[:, -input_ids.shape[1]:]
        else:
            # The mask covers the whole static cache (zeros beyond the tokens so far), as the keys do: models
            # that build position biases from the mask (ALiBi) need it as long as the keys.
            attention_mask = torch.nn.functional.pad(attention_mask, (0, self.max_cache_len - attention_mask.shape[-1]))
        given = {"position_ids": position_ids} if self.positions else {}
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                            **given, **{self.cache_argument: self.cache}).logits
        for owner, name, _, buffers in self.held:  # where the model assigned new tensors, the graph writes them back
            for value, buffer in zip(optree.tree_leaves(getattr(owner, name)), buffers):
                if value is not getattr(self, buffer):
                    getattr(self, buffer).copy_(value)
        return logits


def full_length_layer(layer: Any, max_cache_len: int) -> Any:
    """A full-length static cache layer in place of a sliding-window one, or None for a layer that does not
    slide. A layer that also holds linear-attention states beside its keys gets the class with the same
    other bases (``LinearAttentionLayer`` with ``StaticLayer``), and the options it was made with."""
    from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

    kind = type(layer)
    if not issubclass(kind, StaticSlidingWindowLayer):
        return None
    counterpart = StaticLayer if kind is StaticSlidingWindowLayer else None
    bases = tuple(StaticLayer if base is StaticSlidingWindowLayer else base for base in kind.__bases__)
    pending = list(StaticLayer.__subclasses__())
    while counterpart is None and pending:
        candidate = pending.pop()
        pending += candidate.__subclasses__()
        counterpart = candidate if candidate.__bases__ == bases else None
    if counterpart is None:
        return None
    options = {name: getattr(layer, name) for name in inspect.signature(counterpart.__init__).parameters
               if name not in ("self", "max_cache_len", "args", "kwargs") and hasattr(layer, name)}
    return counterpart(max_cache_len=max_cache_len, **options)


def cache_length(needed: int, limit: int) -> int:
    """The static cache to build for ``needed`` tokens: a power of two from 128, at most ``limit``.

    Every decoding step attends over the whole static cache, so a cache sized to the generation (not to
    the limit) keeps short generations fast; powers of two bound how many graphs are built.
    """
    length = 128
    while length < needed + 1:
        length *= 2
    return min(length, limit)


def _base(compressed: Any) -> torch.nn.Module:
    """The original architecture, empty, on the compressed graph's device, with its position tables."""
    gm = compressed.graph_module
    base = empty_causal_lm(compressed.config, compressed.dtype, compressed.device, class_name=plan_of(gm).class_name)
    match_buffer_dtypes(base, {t: get_tensor(gm, t).dtype for t in tensor_targets(gm)}, HF_PREFIX)
    with torch.no_grad():  # real position tables (ids, rotary frequencies) for the call that allocates the cache
        targets = set(tensor_targets(gm))
        for name, buffer in base.named_buffers():
            theirs = get_tensor(gm, HF_PREFIX + name) if HF_PREFIX + name in targets else None
            if theirs is not None and theirs.shape == buffer.shape:
                buffer.copy_(theirs)
    return base


def _capture_decoder(base: torch.nn.Module, batch_size: int, length: int, one_token: bool,
                     positions: bool = True) -> fx.GraphModule:
    """``base`` with a static cache of ``length`` tokens, captured for any number of tokens per call, or
    (``one_token``, or a model with recurrent states) for one: the graph's meta says which (``ONE_TOKEN``).
    Without ``positions`` the graph ignores its ``position_ids`` input and the model derives its own."""
    module = _CachedCausalLMCall(base, batch_size, length, positions)
    # Recurrent states (held in dicts by linear-attention cache layers) come with masks that take the last
    # T positions of the attention mask, which here covers the whole static cache: one token at a time.
    one_token = one_token or any(key is not None for _, _, key, _ in module.cached)
    example = 1 if one_token else 5
    kwargs = {  # where the weights are: export runs the model on fakes of these, and devices must agree
        "input_ids": torch.zeros(batch_size, example, dtype=torch.long),
        "attention_mask": torch.ones(batch_size, example + 1, dtype=torch.long),  # unlike T, so L stays its own
        "position_ids": torch.arange(example).expand(batch_size, -1).contiguous(),
        "cache_position": torch.arange(example),
    }
    kwargs = {name: value.to(base.device) for name, value in kwargs.items()}
    tokens, total = Dim("tokens", min=1, max=length - 1), Dim("total", min=1, max=length - 1)
    shapes = {"input_ids": {1: tokens}, "attention_mask": {1: total}, "position_ids": {1: tokens},
              "cache_position": {0: tokens}}
    if one_token:
        shapes = {"input_ids": None, "attention_mask": {1: total}, "position_ids": None, "cache_position": None}
    captured = export_graph(base, module, (), kwargs, shapes, causal_lm=True)
    captured.meta[ONE_TOKEN] = one_token
    return captured


def run_decoder(decoder: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                cache_position: torch.Tensor) -> torch.Tensor:
    """``decoder(...)`` for ``T`` tokens; a one-token graph (``ONE_TOKEN``) takes them one at a time."""
    graph = getattr(decoder, "_orig_mod", decoder)  # torch.compile's wrapper
    if not graph.meta.get(ONE_TOKEN) or input_ids.shape[1] == 1:
        return decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       cache_position=cache_position)
    past = attention_mask.shape[1] - input_ids.shape[1]
    return torch.cat([decoder(input_ids=input_ids[:, t : t + 1], attention_mask=attention_mask[:, : past + t + 1],
                              position_ids=position_ids[:, t : t + 1], cache_position=cache_position[t : t + 1])
                      for t in range(input_ids.shape[1])], 1)


def build_decoder(compressed: Any, batch_size: int, length: int) -> fx.GraphModule:
    """The decoding graph for ``compressed`` (a ``SlicedCausalLM``) at ``batch_size``, caching ``length`` tokens.

    It is given the positions ``generate`` computes from the mask, as transformers' ``generate`` does; a
    model whose own positions differ (some start after the padding index), so that this graph does not
    reproduce the compressed model, gets one that derives its positions itself, as its prefill graph does.
    """
    decoder = _decoder_graph(compressed, batch_size, length, positions=True)
    try:
        _verify(decoder, compressed, batch_size)
    except RuntimeError:
        decoder = _decoder_graph(compressed, batch_size, length, positions=False)
        _verify(decoder, compressed, batch_size)
    return decoder


def _decoder_graph(compressed: Any, batch_size: int, length: int, positions: bool) -> fx.GraphModule:
    gm = compressed.graph_module
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            captured = _capture_decoder(_base(compressed), batch_size, length, one_token=False, positions=positions)
        except CaptureError:
            # Code that branches on a one-token input (recurrent layers' step path) cannot be captured
            # for any number of tokens: capture the step alone and feed a prompt through it a token at a time.
            captured = _capture_decoder(_base(compressed), batch_size, length, one_token=True, positions=positions)
        decoder = replay(captured, plan_of(gm))
    _share_tensors(decoder, gm, "decoding graph")
    streamline(decoder)
    return decoder


def build_reshaped(compressed: Any, input_ids: torch.Tensor) -> fx.GraphModule:
    """The compressed graph captured again at ``input_ids``' sequence length (and, for one row, batch 1):
    for a model whose code specialised its capture to the sizes it was captured at (a Python loop over
    the tokens). The plan is replayed on the new capture; the weights are the compressed model's own."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = replay(capture(_base(compressed), example_like(input_ids)), plan_of(compressed.graph_module))
    _share_tensors(graph, compressed.graph_module, "graph captured again")
    return graph


def _share_tensors(graph: fx.GraphModule, gm: fx.GraphModule, what: str) -> None:
    """Point every tensor ``graph`` reads at ``gm``'s tensor of the same name: no second copy of the weights.
    Only the decoding graph's cache buffers (``cache_*``) are its own."""
    shared = set(tensor_targets(gm))
    # A tensor the model's code writes as a literal (torch.tensor([...]) in forward) is not a weight and may
    # follow the sizes of the capture: where it differs, the new graph keeps its own.
    literals = {n.target for n in graph.graph.nodes
                if n.op == "get_attr" and n.users and all(is_op(u, aten.lift_fresh_copy) for u in n.users)}
    for target in tensor_targets(graph):
        if target in shared:
            mine, theirs = get_tensor(graph, target), get_tensor(gm, target)
            if mine.shape != theirs.shape or mine.dtype != theirs.dtype:
                if target in literals:
                    continue
                raise RuntimeError(f"{what} disagrees with the compressed model on {target}")
            set_tensor(graph, target, theirs)
        elif not target.startswith("cache_"):
            raise RuntimeError(f"{what} reads {target}, which the compressed model does not have")


def streamline(gm: fx.GraphModule) -> int:
    """Make ``gm`` copy less, computing the same values; returns how many nodes were rewritten.

    * Grouped-query attention written as ``sdpa(q, repeat(k), repeat(v))``, where ``repeat`` copies each
      of ``k``'s ``H`` heads ``n`` times in a row (``reshape(expand(k[:, :, None], [B, H, n, S, D]),
      [B, H·n, S, D])``, transformers' ``repeat_kv``), becomes ``sdpa(q, k, v, enable_gqa=True)``: query
      head ``i`` attends with key/value head ``i // n`` either way, without the copies.
    * A ``_to_copy`` to the dtype, device and layout its input already has returns an equal tensor:
      its readers read the input instead, unless the value is written in place on either side.
    """
    rewritten = 0
    for node in list(gm.graph.nodes):
        if is_op(node, aten.scaled_dot_product_attention) and not node.kwargs.get("enable_gqa", False):
            keys, values = _repeated_heads(node.args[1]), _repeated_heads(node.args[2])
            heads = getattr(val(node.args[0]), "shape", ())
            if (keys is not None and values is not None and keys[1] == values[1] and len(heads) == 4
                    and statically_known_true(heads[1] == val(keys[0]).shape[1] * keys[1])):
                node.args = (node.args[0], keys[0], values[0], *node.args[3:])
                node.kwargs = {**node.kwargs, "enable_gqa": True}
                rewritten += 1
        elif is_op(node, aten._to_copy) and _idle_cast(node):
            node.replace_all_uses_with(node.args[0])
            rewritten += 1
    eliminate_dead_code(gm)
    gm.recompile()
    return rewritten


def _same(a, b) -> bool:
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def _skip_whole_slices(node: Any) -> Any:
    """The tensor a chain of ``x[:, :]``-style slices (start 0, to the end, step 1) views whole."""
    while (is_op(node, aten.slice) and len(node.args) >= 4 and node.args[2] in (0, None)
           and (node.args[3] is None or (isinstance(node.args[3], int) and node.args[3] >= 2**62))
           and (len(node.args) < 5 or node.args[4] == 1)):
        node = node.args[0]
    return node


def _repeated_heads(node: Any) -> tuple[fx.Node, int] | None:
    """``(x, n)`` when ``node`` is ``x`` (``[B, H, S, D]``) with each head repeated ``n`` times in a row."""
    if not is_op(node, aten.reshape, aten.view, aten._unsafe_view) or not is_op(node.args[0], aten.expand):
        return None
    expand = node.args[0]
    unsqueezed = _skip_whole_slices(expand.args[0])
    if not is_op(unsqueezed, aten.unsqueeze) or unsqueezed.args[1] != 2:
        return None
    x = _skip_whole_slices(unsqueezed.args[0])
    shapes = [getattr(val(n), "shape", None) for n in (x, expand, node)]
    if any(s is None for s in shapes) or [len(s) for s in shapes] != [4, 5, 4]:
        return None
    (b, h, s, d), repeated, out = shapes
    n = repeated[2]
    if not isinstance(n, int) or not _same(repeated, (b, h, n, s, d)) or not _same(out, (b, h * n, s, d)):
        return None
    return x, n


def _idle_cast(node: fx.Node) -> bool:
    source, out = node.args[0], val(node)
    before = val(source)
    if (not isinstance(source, fx.Node) or source.op != "call_function" or not isinstance(before, torch.Tensor)
            or not isinstance(out, torch.Tensor) or set(node.kwargs) - {"dtype", "device", "layout"}):
        return False
    if (before.dtype, before.device, before.layout) != (out.dtype, out.device, out.layout):
        return False
    return not any(mutates(user) for user in (*source.users, *node.users)) and not mutates(source)


@torch.no_grad()
def logit_error(mine: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[float, float]:
    """How far ``mine`` is from ``reference`` (the largest difference over the reference's largest logit)
    and the most it may be for ``dtype`` (default the reference's), the dtype the model computes in: 1e-4
    in float32 and float64 (transformers computes norms in float32 even in a float64 model), 3e-2 in half
    precision."""
    error = float((mine - reference).abs().max() / reference.abs().max().clamp_min(1e-6))
    return error, (1e-4 if (dtype or reference.dtype) in (torch.float32, torch.float64) else 3e-2)


def _verify(decoder: fx.GraphModule, compressed: Any, batch: int) -> None:
    """Prefill 5 tokens and decode 3 more one at a time, then start again from another 3-token prompt (the
    cache rewinds) and decode one: every logit must match the compressed graph's."""
    generator = torch.Generator().manual_seed(0)
    device = compressed.device
    error = 0.0
    for prompt, steps in ((5, 3), (3, 1)):
        ids = torch.randint(0, compressed.config.vocab_size, (batch, prompt + steps), generator=generator).to(device)
        mask = torch.ones_like(ids)
        full = compressed.graph_for(ids, mask)(input_ids=ids, attention_mask=mask).logits
        positions = torch.arange(prompt, device=device)
        logits = [run_decoder(decoder, ids[:, :prompt], torch.ones_like(ids[:, :prompt]), positions.expand(batch, -1),
                              positions)]
        for t in range(prompt, prompt + steps):
            logits.append(decoder(input_ids=ids[:, t : t + 1], attention_mask=torch.ones_like(ids[:, : t + 1]),
                                  position_ids=torch.full((batch, 1), t, device=device),
                                  cache_position=torch.tensor([t], device=device)))
        run, tolerance = logit_error(torch.cat(logits, 1), full)
        error = max(error, run)
    if not error <= tolerance:
        raise RuntimeError(f"the cached decoding graph does not reproduce the model (relative error {error:.2g})")


class Session:
    """One ``generate`` call: prefill the prompt, then feed one token per step through the cache.

    ``forward`` sees the whole sequence at every step (``prepare_inputs_for_generation``); when it is
    the previous sequence plus one token, only that token runs. Anything else (a longer sequence than the
    cache holds, reordered beams) falls back to recomputing the whole sequence with the compressed graph.
    """

    def __init__(self, compressed: Any, needed: int | None = None, compiled: bool = False):
        self.compressed = compressed
        self.compiled = compiled
        limit = compressed.kv_cache_len
        self.length = cache_length(needed, limit) if needed is not None else limit
        self.seen: torch.Tensor | None = None
        self.decoder: fx.GraphModule | None = None

    def _decoder(self, batch: int) -> Any:
        decoders = self.compressed.decoders
        eager = (batch, self.length, False)
        if eager not in decoders:
            try:
                decoders[eager] = build_decoder(self.compressed, batch, self.length)
            except Exception as error:  # decoding still works without a cache; say so once
                warnings.warn(f"fxslice: no KV-cache decoding for this model ({type(error).__name__}: {error}); "
                              "generate() recomputes the whole sequence at every step", stacklevel=4)
                decoders[eager] = None
        if not self.compiled or decoders[eager] is None:
            return decoders[eager]
        compiled = (batch, self.length, True)
        if compiled not in decoders:
            # The prompt and the one-token steps are two shapes: torch.compile specialises on each once
            # (the growing mask becomes a dynamic dimension) and keeps both for later calls.
            decoders[compiled] = torch.compile(decoders[eager])
        return decoders[compiled]

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        batch, length = input_ids.shape
        if length >= self.length or attention_mask.shape != input_ids.shape:
            self.seen = None
            return None
        device = input_ids.device
        follows = (self.seen is not None and self.decoder is not None and length == self.seen.shape[1] + 1
                   and torch.equal(input_ids[:, :-1], self.seen))
        if follows:
            position = attention_mask.long().sum(-1, keepdim=True) - 1
            logits = self.decoder(input_ids=input_ids[:, -1:], attention_mask=attention_mask,
                                  position_ids=position, cache_position=torch.tensor([length - 1], device=device))
        else:
            self.decoder = self._decoder(batch)
            if self.decoder is None:
                return None
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            logits = run_decoder(self.decoder, input_ids, attention_mask, positions, torch.arange(length, device=device))
        self.seen = input_ids
        return logits
