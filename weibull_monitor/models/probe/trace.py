"""One traced forward pass: every use of a weight matrix, and every attention call with the Q, K, V it was handed.

The tracer is a :class:`torch.overrides.TorchFunctionMode`. It sees

- every linear use of a watched parameter (``F.linear``, ``matmul``/``@``, ``mm``, ``addmm``, ``bmm``, ``baddbmm``;
  the parameter itself, its transpose or one expert's slice ``stack[e]``): the op's output gets a zero leaf added
  (``y + z``), so the gradient of anything with respect to ``z`` says which of the op's output features feed it,
  while the forward pass and the graph stay exactly as they were. Each output feature is mapped to the elements of
  the parameter it reads;
- every attention call: through transformers' attention-function registry (the Q, K, V as handed to the kernel,
  with the attention module), ``F.scaled_dot_product_attention``, and the eager path (a ``softmax`` whose input
  came from a product of two tensors, and the product of its probabilities with V). The attention output is cut
  from Q, K, V and replaced by a leaf, so what reads it can be told too.

Nothing here changes a weight or a parameter flag; gradients are taken with respect to the added leaves only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["AttentionCall", "OpRecord", "Tracer", "traced"]

_LINEAR = {F.linear}
# (function, index of the input, index of the weight) for products x @ W (the weight's last axis is the output)
_PRODUCTS = {
    torch.matmul: (0, 1),
    torch.Tensor.matmul: (0, 1),
    torch.Tensor.__matmul__: (0, 1),
    torch.mm: (0, 1),
    torch.Tensor.mm: (0, 1),
    torch.bmm: (0, 1),
    torch.Tensor.bmm: (0, 1),
    torch.addmm: (1, 2),
    torch.Tensor.addmm: (1, 2),
    torch.baddbmm: (1, 2),
    torch.Tensor.baddbmm: (1, 2),
}
_SOFTMAX = {torch.softmax, torch.Tensor.softmax, F.softmax}
_SDPA = {F.scaled_dot_product_attention}
_EINSUM = {torch.einsum}


@dataclass
class OpRecord:
    """One linear use of a watched parameter: ``y = x @ M.T`` with ``M`` a 2-D view of the parameter.

    ``elements[f]`` are the flat indices (into the parameter) of the elements output feature ``f`` reads;
    ``z`` is the zero leaf added to the output (same shape), ``x`` the input as the op saw it."""

    param: str
    elements: torch.Tensor  # int64 [features, inputs]
    x: torch.Tensor
    z: torch.Tensor
    order: int
    stack: tuple[str, ...]
    part: int | None = None  # a batched product over an expert stack: this expert's slice of ``z``

    def select(self, grad: torch.Tensor | None) -> torch.Tensor | None:
        """This record's share of a gradient with respect to ``z``."""
        return grad if grad is None or self.part is None else grad[self.part]


@dataclass
class AttentionCall:
    """One attention call: Q, K, V as the kernel received them and the leaf that replaced its output."""

    module: str | None
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    order: int  # number of op records made before the call
    kind: str  # "interface", "sdpa" or "eager"
    stack: tuple[str, ...] = ()


@dataclass
class Tracer:
    """Watches ``params`` (name -> parameter) during one forward pass."""

    params: dict[str, torch.nn.Parameter]
    module_names: dict[int, str]
    records: list[OpRecord] = field(default_factory=list)
    calls: list[AttentionCall] = field(default_factory=list)
    unsupported: dict[str, str] = field(default_factory=dict)
    stack: list[str] = field(default_factory=list)
    in_interface: int = 0
    _by_id: dict[int, str] = field(default_factory=dict)
    _producers: dict[int, tuple[Any, tuple[torch.Tensor, ...], torch.Tensor]] = field(default_factory=dict)
    _probs: dict[int, tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._by_id = {id(p): name for name, p in self.params.items()}

    # ---------------------------------------------------------------------------------------------- weights
    def watched(self, t: Any) -> str | None:
        if not isinstance(t, torch.Tensor):
            return None
        name = self._by_id.get(id(t))
        if name is None and t._base is not None:
            name = self._by_id.get(id(t._base))
        return name

    def _elements(self, name: str, matrix: torch.Tensor) -> torch.Tensor | None:
        param = self.params[name]
        if matrix.dim() != 2 or not param.is_contiguous():
            return None
        flat = torch.arange(param.numel())
        return flat.as_strided(
            tuple(matrix.shape), matrix.stride(), matrix.storage_offset() - param.storage_offset()
        )

    def record_linear(
        self, name: str, matrix: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """``matrix`` is the [out, in] view of parameter ``name`` that produced ``y``; returns ``y + z``."""
        elements = self._elements(name, matrix)
        if elements is None or y.shape[-1] != matrix.shape[0]:
            self.unsupported.setdefault(name, f"used as a {tuple(matrix.shape)} operand the probe cannot map")
            return y
        z = torch.zeros_like(y, requires_grad=True)
        self.records.append(OpRecord(name, elements, x, z, len(self.records), tuple(self.stack)))
        return y + z

    def record_batched(
        self, name: str, stack: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """A product ``x[e] @ stack[e]`` over a whole expert stack [E, in, out]: one record per expert."""
        if stack.dim() != 3 or x.dim() != 3 or y.dim() != 3 or y.shape[0] != stack.shape[0]:
            self.unsupported.setdefault(name, "read by a batched product the probe cannot map")
            return y
        z = torch.zeros_like(y, requires_grad=True)
        for e in range(stack.shape[0]):
            elements = self._elements(name, stack[e].transpose(0, 1))
            if elements is None:
                return y
            self.records.append(OpRecord(name, elements, x[e], z, len(self.records), tuple(self.stack), e))
        return y + z

    # ---------------------------------------------------------------------------------------------- attention
    def capture(
        self, module: str | None, q: Any, k: Any, v: Any, out: torch.Tensor, kind: str
    ) -> torch.Tensor:
        """Record an attention call; returns the leaf that replaces its output."""
        leaf = out.detach().requires_grad_(True)
        if all(isinstance(t, torch.Tensor) for t in (q, k, v)):
            self.calls.append(
                AttentionCall(module, q, k, v, leaf, len(self.records), kind, tuple(self.stack))
            )
        return leaf

    def note(self, func: Any, inputs: tuple[torch.Tensor, ...], out: Any) -> None:
        """Remember who made ``out`` (for the eager path's walk back from a softmax to the scores product)."""
        if isinstance(out, torch.Tensor) and not any(
            out is i for i in inputs
        ):  # .float() on a float: no step
            self._producers[id(out)] = (func, inputs, out)

    def scores_operands(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Walk back from a softmax input through elementwise steps to the product that made the scores."""
        frontier, seen = [scores], set()
        for _ in range(16):
            nxt = []
            for t in frontier:
                if id(t) in seen:
                    continue
                seen.add(id(t))
                entry = self._producers.get(id(t))
                if entry is None:
                    continue
                func, inputs, _ = entry
                big = [i for i in inputs if i.dim() >= 3]
                if (func in _PRODUCTS or func in _EINSUM) and len(big) >= 2:
                    return big[-2], big[-1]
                nxt += big or list(inputs)
            frontier = nxt
            if not frontier:
                return None
        return None

    def on_softmax(self, probs: torch.Tensor, scores: torch.Tensor) -> None:
        if self.in_interface or probs.dim() < 3:
            return
        operands = self.scores_operands(scores)
        if operands is not None:
            self._probs[id(probs)] = (operands[0], operands[1], tuple(self.stack))

    def follow_probs(self, func: Any, inputs: tuple[torch.Tensor, ...], out: Any) -> Any:
        """Propagate "derived from attention probabilities" and capture V where the probabilities meet it."""
        if not self._probs or not isinstance(out, torch.Tensor):
            return out
        hit = next((i for i in inputs if id(i) in self._probs), None)
        if hit is None:
            return out
        q, k, stack = self._probs[id(hit)]
        if func in _PRODUCTS or func in _EINSUM:
            others = [i for i in inputs if i is not hit and i.dim() >= 3]
            if others:
                del self._probs[id(hit)]
                saved, self.stack = self.stack, list(stack)
                try:
                    return self.capture(None, q, k, others[-1], out, "eager")
                finally:
                    self.stack = saved
        self._probs[id(out)] = (q, k, stack)
        return out


def _tensors(args: Any) -> tuple[torch.Tensor, ...]:
    found: list[torch.Tensor] = []
    for a in args:
        if isinstance(a, torch.Tensor):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            found += [t for t in a if isinstance(t, torch.Tensor)]
    return tuple(found)


class _Mode(TorchFunctionMode):
    def __init__(self, tracer: Tracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tracer = self.tracer
        if func is F.multi_head_attention_forward:
            return self._descend(func, args, kwargs)
        if func in _SDPA and not tracer.in_interface:
            out = func(*args, **kwargs)
            q, k, v = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")])[:3]
            return tracer.capture(None, q, k, v, out, "sdpa")
        out = func(*args, **kwargs)
        if func in _LINEAR and len(args) >= 2:
            name = tracer.watched(args[1])
            if name is not None and isinstance(out, torch.Tensor):
                return tracer.record_linear(name, args[1], args[0], out)
        elif func in _PRODUCTS:
            xi, wi = _PRODUCTS[func]
            if len(args) > wi:
                name = tracer.watched(args[wi])
                weight = args[wi]
                if name is not None and isinstance(out, torch.Tensor) and weight.dim() == 2:
                    return tracer.record_linear(name, weight.transpose(0, 1), args[xi], out)
                if name is not None and isinstance(out, torch.Tensor) and weight.dim() == 3:
                    return tracer.record_batched(name, weight, args[xi], out)
                if name is not None and tracer.watched(args[xi]) is None:
                    tracer.unsupported.setdefault(
                        name, f"read by {getattr(func, '__name__', func)} with a 3-D operand"
                    )
            left = tracer.watched(args[0]) if xi == 0 and len(args) > 1 else None
            if left is not None and tracer.watched(args[1]) is None and args[0].dim() == 2 and out.dim() >= 2:
                # W @ x (Mamba's dt_proj.weight @ time_step): output features along dim -2
                y = out.transpose(-1, -2)
                return tracer.record_linear(left, args[0], args[1].transpose(-1, -2), y).transpose(-1, -2)
        if tracer.in_interface:
            return out
        inputs = _tensors(args) + _tensors(kwargs.values())
        if func in _SOFTMAX and inputs and isinstance(out, torch.Tensor):
            tracer.on_softmax(out, inputs[0])
            return out
        tracer.note(func, inputs, out)
        return tracer.follow_probs(func, inputs, out)

    def _descend(self, func, args, kwargs):
        """Run a Python functional (nn.MultiheadAttention's) with the mode active inside it, so its linear
        projections and its attention call are seen: its own dispatch check is switched off for the call."""
        saved = F.has_torch_function
        F.has_torch_function = lambda *a, **k: False
        try:
            with self:
                return func(*args, **kwargs)
        finally:
            F.has_torch_function = saved


@contextlib.contextmanager
def _module_stack(tracer: Tracer) -> Iterator[None]:
    from torch.nn.modules import module as module_mod

    def push(module, _args):
        name = tracer.module_names.get(id(module))
        if name is not None:
            tracer.stack.append(name)

    def pop(module, _args, _out):
        name = tracer.module_names.get(id(module))
        if name is not None and tracer.stack and tracer.stack[-1] == name:
            tracer.stack.pop()

    handles = [
        module_mod.register_module_forward_pre_hook(push),
        module_mod.register_module_forward_hook(pop, always_call=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _attention_registry(tracer: Tracer) -> Iterator[None]:
    """Wrap every function of transformers' attention registry (when transformers is installed) so a call records
    the Q, K, V it receives and the attention module that made it."""
    try:
        from transformers.modeling_utils import AttentionInterface
    except Exception:  # no transformers: the sdpa and eager paths still see attention
        yield
        return
    mapping = AttentionInterface._global_mapping
    saved = dict(mapping)

    def wrap(fn: Any) -> Any:
        def wrapped(module, query, key, value, *args, **kwargs):
            tracer.in_interface += 1
            try:
                result = fn(module, query, key, value, *args, **kwargs)
            finally:
                tracer.in_interface -= 1
            name = tracer.module_names.get(id(module))
            if isinstance(result, tuple):
                return (tracer.capture(name, query, key, value, result[0], "interface"), *result[1:])
            return tracer.capture(name, query, key, value, result, "interface")

        return wrapped

    try:
        for key, fn in saved.items():
            mapping[key] = wrap(fn)
        yield
    finally:
        mapping.clear()
        mapping.update(saved)


@contextlib.contextmanager
def traced(model: torch.nn.Module, params: dict[str, torch.nn.Parameter]) -> Iterator[Tracer]:
    """Trace the forward passes run inside the block (gradients enabled; weights untouched)."""
    tracer = Tracer(params, {id(m): name for name, m in model.named_modules()})
    with (
        torch.enable_grad(),
        _module_stack(tracer),
        _attention_registry(tracer),
        _Mode(tracer),
    ):
        yield tracer
