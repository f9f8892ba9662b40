"""What ``compile`` hands back for a Hugging Face causal LM: a module that still behaves like one.

``SlicedCausalLM`` wraps the rewritten GraphModule and keeps the original ``config``: ``forward`` takes
``input_ids`` (and an optional ``attention_mask``) and returns ``CausalLMOutputWithPast``; ``generate()``
is transformers' own (``GenerationMixin``), and lm-eval's ``HFLM(pretrained=model, tokenizer=tok)`` accepts
it. Inside ``generate`` the model decodes with a KV cache through a second graph (see ``fxslice.decode``):
the prompt is prefilled once and each new token costs one single-token step.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
import torch.fx as fx
from transformers import GenerationConfig, GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

__all__ = ["RESHAPED_KEPT", "SlicedCausalLM", "graph_module"]

RESHAPED_KEPT = 8
"""How many graphs captured again at other sizes a ``SlicedCausalLM`` keeps (they share its weights)."""


class SlicedCausalLM(torch.nn.Module, GenerationMixin):
    """A compressed causal LM: the rewritten graph plus the original model's config."""

    main_input_name = "input_ids"
    _is_stateful = False

    def __init__(self, graph: fx.GraphModule, config: Any):
        super().__init__()
        self.graph_module = graph
        self.config = config
        self.generation_config = GenerationConfig.from_model_config(config)
        self.name_or_path = getattr(config, "_name_or_path", "")
        self.kv_cache_len = 1024  # most tokens (prompt + generated) a decoding graph holds; longer runs recompute
        self.decoders: dict[tuple, Any] = {}  # (batch, cache length, compiled) -> decoding graph (fxslice.decode)
        self.reshaped: list[fx.GraphModule] = []  # captured again at sizes the graph refuses (graph_for)
        self.graph_of_shapes: dict[tuple, fx.GraphModule] = {}  # input shapes → the graph that takes them
        self._session = None

    @property
    def device(self) -> torch.device:
        from .graph import graph_device

        return graph_device(self.graph_module)

    @property
    def dtype(self) -> torch.dtype:
        return next(p for p in self.graph_module.parameters() if p.is_floating_point()).dtype

    def train(self, mode: bool = True):
        # The graph was captured in eval mode and cannot switch; only the flag is kept (lm-eval calls eval()).
        self.training = mode
        return self

    def tie_weights(self, *args, **kwargs) -> None:
        """Weights tied in the original stay tied in the graph; nothing to do (called by lm-eval)."""

    def num_parameters(self, *args, **kwargs) -> int:
        from .graph import unique_parameters

        return unique_parameters(self.graph_module)

    def get_experts_implementation(self) -> dict:
        return {}

    @classmethod
    def can_generate(cls) -> bool:
        return True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the KV cache lives in fxslice's decoding graph, not in a transformers Cache

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> CausalLMOutputWithPast:
        from .streaming import materialize

        materialize(self.graph_module)  # a streamed model runs with its weights in memory
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self._session is not None:
            logits = self._session.step(input_ids, attention_mask)
            if logits is not None:
                return CausalLMOutputWithPast(logits=logits)
        out = self.graph_for(input_ids, attention_mask)(input_ids=input_ids, attention_mask=attention_mask)
        return CausalLMOutputWithPast(logits=out.logits if hasattr(out, "logits") else out[0])

    def graph_for(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> fx.GraphModule:
        """The graph that takes these inputs: ``graph_module``, unless the model's code specialised its
        capture to other sizes; then one captured again at these (``decode.build_reshaped``), kept for
        later calls (the last ``RESHAPED_KEPT`` of them). Which graph takes which shapes is remembered."""
        from .capture import refusal
        from .decode import build_reshaped

        shapes = (tuple(input_ids.shape), tuple(attention_mask.shape))
        graph = self.graph_of_shapes.get(shapes)
        if graph is not None:
            return graph
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        graph = next((g for g in [self.graph_module, *self.reshaped] if refusal(g, kwargs=inputs) is None), None)
        if graph is None:
            if not self.reshaped:
                warnings.warn(f"fxslice: {self.config.model_type}'s code specialised its graph to the sizes it was "
                              f"captured at; it is captured again for inputs of shape {tuple(input_ids.shape)} "
                              "(and for each new shape; the graphs are kept)", stacklevel=3)
            graph = build_reshaped(self, input_ids)
            self.reshaped = [graph, *self.reshaped][:RESHAPED_KEPT]
            kept = [self.graph_module, *self.reshaped]
            self.graph_of_shapes = {k: g for k, g in self.graph_of_shapes.items() if any(g is h for h in kept)}
        self.graph_of_shapes[shapes] = graph
        return graph

    @torch.no_grad()
    def generate(self, *args, compiled: bool = False, **kwargs):
        """transformers' ``generate``, run with fxslice's KV-cache decoding graph where it applies;
        ``compiled=True`` runs that graph through ``torch.compile`` (compiled once per batch size and
        cache length, and kept for later calls)."""
        from .streaming import materialize

        materialize(self.graph_module)
        with self._incremental(_tokens_needed(self, args, kwargs), compiled):
            return super().generate(*args, **kwargs)

    @contextlib.contextmanager
    def _incremental(self, needed: int | None, compiled: bool = False):
        from .decode import Session

        previous, self._session = self._session, Session(self, needed, compiled)
        try:
            yield
        finally:
            self._session = previous


def _tokens_needed(model: SlicedCausalLM, args: tuple, kwargs: dict) -> int | None:
    """Prompt plus new tokens of a ``generate`` call, when it says (None: use the largest cache)."""
    ids = args[0] if args else kwargs.get("input_ids")
    config = kwargs.get("generation_config") or model.generation_config
    if not isinstance(ids, torch.Tensor):
        return None
    new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
    if new is not None:
        return ids.shape[-1] + int(new)
    total = kwargs.get("max_length", getattr(config, "max_length", None))
    return int(total) if total is not None else None


def graph_module(model: torch.nn.Module) -> fx.GraphModule:
    """The GraphModule inside whatever ``compile`` returned."""
    if isinstance(model, SlicedCausalLM):
        return model.graph_module
    if isinstance(model, fx.GraphModule):
        return model
    raise TypeError(f"expected a model returned by fxslice.compile; got {type(model).__name__}")
