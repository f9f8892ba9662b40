"""The two kinds of failure fxslice reports on purpose.

``UnsupportedGraphError`` means the *input* is outside what fxslice can handle: it names the node, the
module it came from and its source line, and says what to do. Anything else raised from fxslice is a bug.
"""

from __future__ import annotations

import torch.fx as fx

__all__ = ["UnsupportedGraphError", "CaptureError", "PassOrderError", "CalibrationError", "describe_node", "module_path"]


class UnsupportedGraphError(ValueError):
    """The model, graph or input cannot be handled; the message says where and what to do."""


class CaptureError(UnsupportedGraphError):
    """torch.export could not turn the model into a graph."""


class PassOrderError(UnsupportedGraphError):
    """The pass list is not in an order the passes accept; lists every violation."""


class CalibrationError(UnsupportedGraphError):
    """Calibration data is empty, malformed or does not match the model's inputs."""


def module_path(node: fx.Node, strip: str = "") -> str:
    """Dotted path of the innermost module that produced ``node`` (``"<top>"`` when unknown)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<top>"
    path = list(stack.values())[-1][0]
    if strip and path.startswith(strip):
        path = path[len(strip):]
    return path or "<top>"


def _source_line(node: fx.Node) -> str:
    trace = node.meta.get("stack_trace") or ""
    lines = [line.strip() for line in trace.strip().splitlines() if line.strip()]
    # The last 'File ..., line N' entry and the code under it are the op's own source line.
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("File "):
            code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else ""
            return f"{lines[i]}: {code}".rstrip(": ")
    return ""


def describe_node(node: fx.Node) -> str:
    """One line that lets a user find ``node``: its FX form, the module path and the source line."""
    from .plan import plan_of

    gm = node.graph.owning_module
    prefix = plan_of(gm).module_prefix if isinstance(gm, fx.GraphModule) else ""
    text = f"node {node.format_node()!s} in module '{module_path(node, prefix)}'"
    line = _source_line(node)
    return f"{text} ({line})" if line else text
