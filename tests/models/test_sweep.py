"""The sweep on a representative subset (the whole sweep is ``weibull-monitor roles --sweep``, ~2 min on 2 cores):
every family here builds tiny, every block matrix gets a class, every split used is verified by the probe against
the family's own forward pass, and no split is wrong."""

from __future__ import annotations

import pytest

from weibull_monitor.models import layout_table
from weibull_monitor.models.sweep import run

pytest.importorskip("transformers")

#: one family per layout and per kind of mixer: plain GQA, Conv1D, per-head interleaved, Falcon, concatenated with
#: a fused gate-up, MPT thirds, CodeGen's blocks, MLA with MoE, gated attention with linear attention, transposed
#: interleaved experts, SSM, encoder, encoder-decoder, torch's own MultiheadAttention
REPRESENTATIVE = (
    "llama",
    "gpt2",
    "gpt_neox",
    "falcon",
    "phi3",
    "mpt",
    "codegen",
    "deepseek_v3",
    "qwen3_next",
    "gpt_oss",
    "mamba",
    "jetmoe",
    "bert",
    "t5",
    "torch_mha",
)


@pytest.fixture(scope="module")
def results():
    return {r.model_type: r for r in run.run_sweep(REPRESENTATIVE, discover=True)}


def test_every_representative_family_builds_and_is_fully_classified(results):
    for name, r in results.items():
        assert r.built and not r.reason, (name, r.reason)
        assert r.fully_classified, (name, r.unclassified)


def test_every_split_used_is_verified_and_none_is_wrong(results):
    for name, r in results.items():
        assert not r.wrong_splits, (name, r.wrong_splits)
        assert r.splits_used == r.splits_verified, (name, r.unreached)
        assert not r.splits_refused, (name, r.splits_refused)
    c = run.coverage(list(results.values()))
    assert c["splits_used"] >= 20 and c["splits_unverified"] == 0 and c["wrong_splits"] == 0


def test_the_role_map_agrees_with_the_probe(results):
    for name, r in results.items():
        assert not r.mismatches, (name, r.mismatches[:3])
        assert r.verified >= 0.75 * r.checked, (name, r.verified, r.checked)


def test_the_verified_table_holds_what_the_probe_verifies(results):
    # every layout the probe verifies on a representative family is listed for it, and every layout listed for a
    # representative family verifies (--discover tries every candidate on every fused parameter)
    found: dict[str, set[str]] = {}
    for r in results.values():
        for layouts in r.discovered.values():
            for layout in layouts:
                found.setdefault(layout, set()).add(r.config_type or r.model_type)
    for layout, families in found.items():
        listed = layout_table.VERIFIED.get(layout)
        if listed is None:
            continue  # a layout told by name or shape alone
        for family in families:
            assert family in listed or layout in ("falcon.query_key_value",), (layout, family)
    for r in results.values():
        for name, layout in r.layouts.items():
            assert (
                layout in found and (r.config_type or r.model_type) in found[layout]
            ) or layout.startswith("torch"), (r.model_type, name, layout)


def test_the_table_lists_the_results(results):
    table = run.coverage_table(list(results.values()))
    assert table.count("\n| ") == len(REPRESENTATIVE)  # a row per family after the header
    assert "fully classified (100.0%)" in table and "wrong 0" in table


def test_a_family_that_cannot_be_built_is_listed_with_the_reason():
    (r,) = run.run_sweep(["no-such-model-type"])
    assert not r.built and r.reason.startswith("not built:")
    assert "| no-such-model-type | no |" in run.coverage_table([r])
