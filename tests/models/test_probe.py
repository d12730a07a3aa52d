"""The layout probe: what it reads off a forward pass, that it catches wrong splits (the silent ones the role map
made before it: CodeGen's qkv_proj as concatenated blocks, GPT-OSS's interleaved expert gate-up as halves), that
it leaves the model as it was, and that layouts learned from it equal the verified table."""

from __future__ import annotations

import pytest
import torch

from weibull_monitor.models import FusedLayout, model_roles, register_layout, split_fused
from weibull_monitor.models import layouts as layouts_module
from weibull_monitor.models.layout_table import per_head_interleaved
from weibull_monitor.models.probe import probe_model
from weibull_monitor.models.probe.analysis import BITS
from weibull_monitor.models.probe.learn import learn_layouts
from weibull_monitor.models.probe.verify import verify_roles
from weibull_monitor.models.sweep import run

pytest.importorskip("transformers")


def probed(family: str):
    model, config = run.build_family(family)
    roles = model_roles(model)
    labels, tracer = probe_model(model, run.family_inputs(family, model, config), roles=roles)
    return model, config, roles, labels, tracer


def composition(bits: torch.Tensor) -> set[str]:
    names = {"q", "k", "v", "o", "mlp_in", "mlp_out"}
    return {n for value in bits.unique().tolist() for n in names if value & BITS[n]}


def test_llama_labels_every_projection_head_by_head():
    model, _, roles, labels, tracer = probed("llama")
    assert len(tracer.calls) == 2 and {c.kind for c in tracer.calls} == {"interface"}
    for name, role in roles.items():
        seen = composition(labels.bits[name])
        expected = {
            "q": {"q"},
            "k": {"k"},
            "v": {"v"},
            "o": {"o"},
            "ffn_gate": {"mlp_in"},
            "ffn_up": {"mlp_in"},
            "ffn_down": {"mlp_out"},
        }.get(role.component)
        if expected is not None:
            assert seen == expected, (name, seen)
    q_heads = labels.heads["model.layers.0.self_attn.q_proj.weight"]["q"].view(64, 64)[:, 0]
    assert q_heads.tolist() == [h for h in range(4) for _ in range(16)]  # head by head, in order
    kv = model.config.num_key_value_heads
    k_heads = labels.heads["model.layers.0.self_attn.k_proj.weight"]["k"].view(kv * 16, 64)[:, 0]
    assert k_heads.tolist() == [h for h in range(kv) for _ in range(16)]
    gate = labels.bits["model.layers.0.mlp.gate_proj.weight"]
    up = labels.bits["model.layers.0.mlp.up_proj.weight"]
    assert ((gate & BITS["nonlinear"]) != 0).all() and (
        (up & BITS["linear"]) != 0
    ).all()  # the GLU's two sides


def test_the_probe_leaves_the_model_as_it_was():
    model, config = run.build_family("gpt2")
    model.train()
    model.transformer.h[0].attn.c_attn.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    probe_model(model, run.family_inputs("gpt2", model, config))
    assert model.training and all(m.training for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    "family, layout",
    [
        ("codegen", "qkv.concatenated"),  # the layout the role map used to apply to every qkv_proj
        ("gpt_oss", "gate_up.chunk"),  # halves of a transposed, interleaved expert stack
        ("phi3", "codegen.qkv_proj"),  # another family's qkv_proj layout on a GQA projection
    ],
)
def test_a_wrong_layout_is_caught(family, layout):
    model, config, roles, labels, _ = probed(family)
    wrong = next(entry for entry in layouts_module.registered_layouts() if entry.name == layout)
    fused = next(
        name
        for name, role in roles.items()
        if role.parts and wrong.applies(_query(name, role, model, config))
    )
    from weibull_monitor.models.probe.verify import _check_split, _glu_scopes, _scope

    checks = _check_split(
        fused,
        roles[fused],
        labels.bits[fused],
        _scope(fused) in _glu_scopes(roles, labels),
        labels,
        config,
        wrong,
    )
    assert checks and any(c.status == "mismatch" for c in checks), [(c.key, c.status) for c in checks]


def _query(name, role, model, config):
    from weibull_monitor.models.layouts import LayoutQuery
    from weibull_monitor.models.naming import strip

    shape = tuple(dict(model.named_parameters())[name].shape)
    shape = shape[1:] if role.stacked else shape
    inner = role
    if role.stacked:
        from weibull_monitor.models.components import Role

        inner = Role(role.layer, role.component, role.klass, parts=("ffn_gate", "ffn_up"))
    return LayoutQuery(
        strip(name), strip(name).rsplit(".", 1)[-1].lower(), inner, config.model_type, config, shape
    )


def test_right_rows_in_the_wrong_head_order_are_caught():
    _, config, roles, labels, _ = probed("gpt_neox")

    def shuffled_heads(weight, query, as_matrix):
        parts = per_head_interleaved(weight, 4, 16, as_matrix=False)
        parts["q"] = parts["q"].flip(0)  # every query row is a query row, but head 3 comes first
        return parts

    layout = FusedLayout(
        "test.shuffled", lambda q: q.last == "query_key_value", shuffled_heads, frozenset({"gpt_neox"})
    )
    register_layout(layout)
    try:
        report = verify_roles(roles, labels, config)
    finally:
        layouts_module._REGISTRY[:] = [e for e in layouts_module._REGISTRY if e.name != "test.shuffled"]
    q_checks = [c for c in report.checks if c.key.endswith("[q]")]
    assert q_checks and all(c.status == "mismatch" and "head order" in c.detail for c in q_checks)
    assert all(c.heads_checked for c in report.checks if c.key.endswith("[k]"))


@pytest.mark.parametrize("family", ["gpt_neox", "deepseek_v3", "gpt_oss"])
def test_layouts_learned_at_run_time_equal_the_verified_table(family, monkeypatch):
    model, config = run.build_family(family)
    params = dict(model.named_parameters())
    roles = model_roles(model)
    fused = [n for n, r in roles.items() if r.parts]
    reference = {n: split_fused(n, params[n].detach(), config, role=roles[n]) for n in fused}
    # forget every layout the table verified: only what the forward pass shows remains
    monkeypatch.setattr(
        layouts_module, "_REGISTRY", [e for e in layouts_module._REGISTRY if e.families is None]
    )
    with pytest.raises(ValueError, match=r"no layout verified|no split layout"):
        split_fused(fused[0], params[fused[0]].detach(), config, role=roles[fused[0]])
    learned = learn_layouts(model, run.family_inputs(family, model, config))
    assert learned
    for name in fused:
        got = split_fused(name, params[name].detach(), config, role=roles[name])
        for part, tensor in reference[name].items():
            assert torch.equal(got[part].reshape(tensor.shape), tensor), (name, part)
        # learned periodic layouts are views: nothing is copied at fit time
        as_views = split_fused(name, params[name].detach(), config, role=roles[name], as_matrix=False)
        assert all(
            v.untyped_storage().data_ptr() == params[name].untyped_storage().data_ptr()
            for v in as_views.values()
        )
