"""What a traced forward pass says about each weight element: which attention tensor it feeds, head by head, whether
it reads an attention output, and where it sits in a token-wise MLP chain (and on which side of a GLU).

Every answer comes from gradients with respect to the zero leaves the tracer added, never from a name:

- Q/K/V: the gradient of each captured tensor (one head at a time) reaches exactly the output features of the
  projections that feed it; only the projections inside the attention module that made the call (and used since its
  previous call) are asked, so an earlier layer that feeds everything through the residual stream is not;
- O: a projection whose input depends on the attention output leaf reads the attention output;
- MLP: a projection whose output reaches another projection's input of the same module without passing an attention
  (attention outputs are leaves) and only at the same token is the input side of an MLP, the other its output side;
  one that reaches other tokens too sits in a token mixer (a recurrence, a convolution);
- GLU: the second derivative of the down projection's input along a feature is zero for the linear ("up") side and
  not for the side that goes through the activation ("gate"); feature subsets by the bits of the feature index (and
  their complements) separate every gate from the up feature it multiplies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from weibull_monitor.models.probe.trace import AttentionCall, OpRecord, Tracer

__all__ = ["BITS", "Labels", "analyse"]

Q, K, V, O = 1, 2, 4, 8  # noqa: E741  (the attention tensors)
MLP_IN, MLP_OUT, NONLINEAR, LINEAR = 16, 32, 64, 128
USED, MIXER_IN, MIXER_OUT, OUTSIDE = 256, 512, 1024, 2048
BITS = {
    "q": Q,
    "k": K,
    "v": V,
    "o": O,
    "mlp_in": MLP_IN,
    "mlp_out": MLP_OUT,
    "nonlinear": NONLINEAR,
    "linear": LINEAR,
    "used": USED,
    "mixer_in": MIXER_IN,
    "mixer_out": MIXER_OUT,
    "outside": OUTSIDE,
}


@dataclass
class Labels:
    """Per parameter: ``bits[name]`` (int32, the parameter's shape) and ``heads[name][t]`` (the head of tensor ``t``
    each element feeds: -1 none, -2 several)."""

    bits: dict[str, torch.Tensor] = field(default_factory=dict)
    heads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    calls: int = 0
    notes: list[str] = field(default_factory=list)

    def mark(self, name: str, elements: torch.Tensor, bit: int) -> None:
        flat = self.bits[name].view(-1)
        flat[elements.reshape(-1)] |= bit

    def mark_head(self, name: str, tensor: str, elements: torch.Tensor, head: int) -> None:
        heads = self.heads.setdefault(name, {})
        if tensor not in heads:
            heads[tensor] = torch.full_like(self.bits[name], -1).view(-1)
        flat, idx = heads[tensor], elements.reshape(-1)
        current = flat[idx]
        flat[idx] = torch.where((current == -1) | (current == head), torch.full_like(current, head), -2)


def _feature_mask(grad: torch.Tensor | None) -> torch.Tensor | None:
    if grad is None:
        return None
    return grad.reshape(-1, grad.shape[-1]).ne(0).any(0)


def _owner(param: str) -> str:
    return param.rsplit(".", 1)[0] if "." in param else ""


def _under(param: str, module: str) -> bool:
    return module == "" or param.startswith(module + ".")


def _inside(record: OpRecord, module: str) -> bool:
    """The op ran inside ``module``'s forward (a module tied to another one's weights counts as itself)."""
    return module == "" or module in record.stack or (_under(record.param, module) and not record.stack)


def _resolve_module(call: AttentionCall, records: list[OpRecord], params: dict) -> str | None:
    """The attention module of a call: the one the registry named, else the innermost module on the call's stack
    (or the one around it when the innermost holds no parameter at all: a pure compute module)."""
    if call.module is not None:
        return call.module
    for module in reversed(call.stack):
        if any(_inside(r, module) for r in records[: call.order]):
            return module
        if any(_under(p, module) for p in params):
            return None
    return None


def _grads(output: torch.Tensor, leaves: list[torch.Tensor], create_graph: bool = False) -> list:
    if not leaves or not output.requires_grad:
        return [None] * len(leaves)
    weights = torch.randn(output.shape, dtype=output.dtype, generator=_GEN)
    return list(
        torch.autograd.grad(
            (output * weights).sum(), leaves, retain_graph=True, allow_unused=True, create_graph=create_graph
        )
    )


_GEN = torch.Generator().manual_seed(0)


def _masks(output: torch.Tensor, records: list[OpRecord]) -> list[torch.Tensor | None]:
    """Per record, which of its output features ``output`` depends on (None: none)."""
    out = []
    for r, g in zip(records, _grads(output, [r.z for r in records])):
        mask = _feature_mask(r.select(g)) if g is not None else None
        out.append(mask if mask is not None and mask.any() else None)
    return out


def analyse(tracer: Tracer, routers: frozenset[str] = frozenset()) -> Labels:
    """Labels of every watched parameter from one traced forward pass (see the module docstring). ``routers``:
    parameters that route (experts, tokens): their outputs scale expert inputs, which is no MLP step."""
    labels = Labels(calls=len(tracer.calls))
    for name, param in tracer.params.items():
        labels.bits[name] = torch.zeros(param.shape, dtype=torch.int32)
    records = tracer.records
    for r in records:
        labels.mark(r.param, r.elements, USED)
    # which projections each call owns: those of its module used since the module's previous call (back-to-back
    # calls of one module, as in differential attention, share them) that feed only some of its Q, K, V. A
    # projection that feeds all three alike writes the residual stream (the output of the same module's previous
    # call, when a model runs a block twice) and is no projection of this call.
    owned: set[int] = set()
    plan: list[tuple[AttentionCall, str]] = []
    windows: dict[str, tuple[int, int]] = {}
    for call in tracer.calls:
        module = _resolve_module(call, records, tracer.params)
        if module is None:
            labels.notes.append("an attention call whose module could not be told")
            continue
        start, last = windows.get(module, (0, 0))
        if any(_inside(r, module) and id(r) not in owned for r in records[last : call.order]):
            start = last
        windows[module] = (start, call.order)
        window = [r for r in records[start : call.order] if _inside(r, module)]
        feeds = [_masks(t, window) for t in (call.q, call.k, call.v)]
        own = []
        for i, r in enumerate(window):
            masks = [f[i] for f in feeds]
            alike = all(m is not None for m in masks) and bool((masks[0] & masks[1] & masks[2]).all())
            if not alike and any(m is not None for m in masks):
                own.append(r)
        owned.update(id(r) for r in own)
        plan.append((call, module))
        _attention_feeds(labels, call, own)
        _outside_feeds(labels, call, records[: call.order], module)
    # what reads each call's output, in its module, else in the module around it (BERT's attention.output.dense
    # sits beside attention.self); projections some call owns are never outputs
    readers: set[int] = set()
    for call, module in plan:
        for scope in (module, module.rsplit(".", 1)[0] if "." in module else ""):
            after = [r for r in records[call.order :] if _inside(r, scope) and id(r) not in owned]
            hits = [r for r, m in zip(after, _input_reads(after, call.out)) if m]
            if scope != module:  # the module around: only the first reader's module (not the MLP after it)
                hits = [r for r in hits if _owner(r.param) == _owner(hits[0].param)]
            for r in hits:
                labels.mark(r.param, r.elements, O)
                readers.add(id(r))
            if hits:
                break
    _mlp_chains(
        labels, [r for r in records if id(r) not in owned and id(r) not in readers and r.param not in routers]
    )
    return labels


def _input_reads(records: list[OpRecord], leaf: torch.Tensor) -> list[bool]:
    """Per record: does its input depend on ``leaf``?"""
    out = []
    for r in records:
        g = _grads(r.x, [leaf])[0] if r.x.requires_grad else None
        out.append(g is not None and bool(g.ne(0).any()))
    return out


def _attention_feeds(labels: Labels, call: AttentionCall, own: list[OpRecord]) -> None:
    for tensor, bit, key in ((call.q, Q, "q"), (call.k, K, "k"), (call.v, V, "v")):
        heads = tensor.shape[1] if tensor.dim() == 4 else 1
        for head in range(heads):
            part = tensor[:, head] if tensor.dim() == 4 else tensor
            for r, mask in zip(own, _masks(part, own)):
                if mask is None:
                    continue
                elements = r.elements[mask]
                labels.mark(r.param, elements, bit)
                if heads > 1:
                    labels.mark_head(r.param, key, elements, head)


def _outside_feeds(labels: Labels, call: AttentionCall, before: list[OpRecord], module: str) -> None:
    """Projections outside the attention module that feed only some of its Q, K, V (a shared KV projection, a query
    computed in the block): marked ``outside``. A residual-stream writer feeds all three and is not."""
    prefix = module.rsplit(".", 1)[0]
    candidates = [r for r in before if not _inside(r, module) and _inside(r, prefix)]
    if not candidates:
        return
    masks = [_masks(t, candidates) for t in (call.q, call.k, call.v)]
    for i, r in enumerate(candidates):
        feeds = [m[i] for m in masks]
        present = [m for m in feeds if m is not None]
        if not present:
            continue
        if len(present) < 3:
            labels.mark(r.param, r.elements[present[0] | (present[-1])], OUTSIDE)
            continue
        partial = (feeds[0] | feeds[1] | feeds[2]) & ~(feeds[0] & feeds[1] & feeds[2])
        if partial.any():
            labels.mark(r.param, r.elements[partial], OUTSIDE)


_INDEX = re.compile(r"\.\d+(?=\.|$)")


def _block(param: str) -> str:
    """The block a parameter sits in: its name up to the last numeric segment (``model.layers.3``)."""
    found = list(_INDEX.finditer(param))
    return param[: found[-1].end()] if found else ""


def _same_scope(a: OpRecord, b: OpRecord) -> bool:
    oa, ob = _owner(a.param), _owner(b.param)
    return oa == ob or _owner(oa) == _owner(ob) or (_block(a.param) == _block(b.param) != "")


_PROBES = 4  # output features sampled per chain to tell an elementwise step from a normalisation


def _mlp_chains(labels: Labels, records: list[OpRecord]) -> None:
    """Input and output sides of MLPs, token mixers, and the two sides of a GLU.

    ``r1 -> r2`` is a step of an MLP when each feature of r2's input depends on at most two features of r1's
    output (an elementwise activation, or the gate and up feature of a GLU), at the same token only. A residual
    link through a normalisation makes every feature depend on all of them and is no step; an elementwise step
    that reaches other tokens too is a token mixer (a convolution, a recurrence)."""
    for j, r2 in enumerate(records):
        if not r2.x.requires_grad:
            continue
        feeders = [r1 for r1 in records[:j] if _same_scope(r1, r2) and r1.z is not r2.z]
        if not feeders:
            continue
        chain = [(r1, m) for r1, m in zip(feeders, _masks(r2.x, feeders)) if m is not None]
        if not chain:
            continue
        x2 = r2.x.reshape(-1, r2.x.shape[-1])
        width = x2.shape[-1]
        picks = sorted({int(i * (width - 1) / max(1, _PROBES - 1)) for i in range(_PROBES)})
        steps, mixer = [], False
        for r1, mask in chain:
            kind = _step_kind(x2, r1, picks)
            if kind is None:
                continue
            labels.mark(r1.param, r1.elements[mask], MLP_IN if kind == "mlp" else MIXER_IN)
            mixer = mixer or kind == "mixer"
            steps.append((r1, mask))
        if not steps:
            continue
        labels.mark(r2.param, r2.elements, MIXER_OUT if mixer else MLP_OUT)
        if not mixer:
            _glu_sides(labels, r2, steps)


def _step_kind(x2: torch.Tensor, r1: OpRecord, picks: list[int]) -> str | None:
    """'mlp', 'mixer' or None (no elementwise step) for the dependency of ``x2`` (rows = tokens) on ``r1``."""
    z = r1.z
    rows = x2.shape[0]
    token_wise = True
    for feature in picks:
        g = r1.select(_grads(x2[-1, feature], [z])[0]) if x2.requires_grad else None
        if g is None:
            continue
        g = g.reshape(-1, g.shape[-1]).ne(0)
        if int(g.any(0).sum()) > 2:
            return None
        if g.shape[0] == rows and g[:-1].any():
            token_wise = False
    return "mlp" if token_wise else "mixer"


def _glu_sides(labels: Labels, r2: OpRecord, chain: list[tuple[OpRecord, torch.Tensor]]) -> None:
    """Features whose second derivative (of the down input) can vanish are the linear side of a GLU."""
    leaves = [r1.z for r1, _ in chain]
    first = [r1.select(g) if g is not None else None for (r1, _), g in zip(chain, _grads(r2.x, leaves, True))]
    zero_seen = [torch.zeros(int(mask.shape[0]), dtype=torch.bool) for _, mask in chain]
    # feature subsets by the bits of each feature's index over the whole chain, and their complements: for any two
    # features some subset holds one and not the other, so every up feature is once moved without its gate
    offsets, total = [], 0
    for _r1, mask in chain:
        offsets.append(total)
        total += int(mask.shape[0])
    bits = max(1, (total - 1).bit_length())
    for round_ in range(2 * bits):
        directions = []
        for (_r1, mask), offset in zip(chain, offsets):
            index = torch.arange(offset, offset + mask.shape[0])
            pick = ((index >> (round_ // 2)) & 1) == (round_ % 2)
            shape = first[len(directions)].shape if first[len(directions)] is not None else (1, mask.shape[0])
            directions.append(torch.randn(shape, generator=_GEN) * (pick & mask))
        terms = [(g * d).sum() for g, d in zip(first, directions) if g is not None and g.requires_grad]
        if not terms:  # the chain is linear in every feature
            for z in zero_seen:
                z.fill_(True)
            break
        second = torch.autograd.grad(sum(terms), leaves, retain_graph=True, allow_unused=True)
        for i, ((r1_, _), h, d) in enumerate(zip(chain, second, directions)):
            moved = d.reshape(-1, d.shape[-1]).ne(0).any(0)
            if h is None:
                zero_seen[i] |= moved
                continue
            h = r1_.select(h)
            flat = h.reshape(-1, h.shape[-1]).ne(0).any(0)
            zero_seen[i] |= moved & ~flat
    for (r1, mask), linear in zip(chain, zero_seen):
        labels.mark(r1.param, r1.elements[mask & linear], LINEAR)
        labels.mark(r1.param, r1.elements[mask & ~linear], NONLINEAR)
