"""PEFT fine-tunes (LoRA, DoRA, QLoRA where bitsandbytes runs): every adapted matrix is fitted as the weight the
forward pass uses, under the base matrix's role; frozen matrices once; the A/B factors apart from every class;
through the plain monitor, the HF Trainer and Lightning callbacks, and the checkpoint scan."""

from __future__ import annotations

import copy
import json

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from weibull_monitor import WeibullMonitor  # noqa: E402
from weibull_monitor.estimator import fit_weibull  # noqa: E402
from weibull_monitor.models import model_roles  # noqa: E402
from weibull_monitor.snapshot import keys  # noqa: E402
from weibull_monitor.snapshot.adapters import Adapters, effective_weight, find_adapters  # noqa: E402

# These tests train (optimizer steps): .ci/run runs them again under another ATEN_CPU_CAPABILITY.
pytestmark = pytest.mark.trains

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STATED_TOLERANCE = 5e-4  # docs/estimator.md: the engine's |dk| budget against the full sort


def tiny_llama(hidden: int = 128) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def lora(model: torch.nn.Module, **options) -> torch.nn.Module:
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=options.pop("targets", TARGETS), **options)
    return peft.get_peft_model(model, config)


def train(model: torch.nn.Module, steps: int, monitor: WeibullMonitor | None = None, optimizer=None):
    optimizer = optimizer or torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1
    )
    generator = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        ids = torch.randint(0, 128, (4, 16), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if monitor is not None:
            monitor.observe(step)
    return optimizer


@pytest.mark.parametrize("variant", ["lora", "dora", "rslora"])
def test_the_effective_weight_is_the_merged_weight(variant):
    options = {"use_dora": True} if variant == "dora" else {"use_rslora": True} if variant == "rslora" else {}
    model = lora(tiny_llama(), **options)
    train(model, 3)
    layers = find_adapters(model)
    assert len(layers) == 2 * len(TARGETS)
    merged = dict(copy.deepcopy(model).merge_and_unload().named_parameters())
    for base, layer in layers.items():
        plain = base.removeprefix("base_model.model.").replace(".base_layer", "")
        torch.testing.assert_close(effective_weight(layer), merged[plain], rtol=0, atol=1e-6)


def test_conv1d_adapters_and_their_split_parts():
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128)
    torch.manual_seed(0)
    model = lora(transformers.GPT2LMHeadModel(config), targets=["c_attn"], fan_in_fan_out=True)
    monitor = WeibullMonitor(model, every=1, store=None)
    train(model, 3, monitor)
    merged = copy.deepcopy(model).merge_and_unload()
    weight = dict(merged.named_parameters())["transformer.h.0.attn.c_attn.weight"]
    snap = monitor.last_snapshot
    base = "base_model.model.transformer.h.0.attn.c_attn.base_layer.weight"
    for i, part in enumerate("qkv"):
        exact = fit_weibull(weight[:, 64 * i : 64 * (i + 1)], method="exact")
        assert abs(snap.fits[f"{base}[{part}]"].k - exact.k) < STATED_TOLERANCE
        assert snap.roles[f"{base}[{part}]"].component == part


def test_effective_k_equals_the_exact_fit_of_the_merged_matrix():
    model = lora(tiny_llama(256))
    monitor = WeibullMonitor(model, every=10, store=None)
    train(model, 10, monitor)
    snap = monitor.last_snapshot
    merged = dict(copy.deepcopy(model).merge_and_unload().named_parameters())
    worst = 0.0
    for key in snap.adapted:
        plain = key.removeprefix("base_model.model.").replace(".base_layer", "")
        worst = max(worst, abs(snap.fits[key].k - fit_weibull(merged[plain], method="exact").k))
    assert len(snap.adapted) == 2 * len(TARGETS)
    assert worst < STATED_TOLERANCE, worst


def test_monitor_roles_factors_frozen_matrices_and_optimizer_groups():
    model = lora(tiny_llama(), targets=["q_proj", "v_proj"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.1)
    monitor = WeibullMonitor(model, optimizer, every=5, store=None, adapter_factors_every=1)
    monitor.observe(0)
    first = monitor.last_snapshot
    # the factors are no matrix of the role map, and lora_B (zero at step 0) raises nothing
    assert not [k for k in first.fits if "lora_" in k] and not first.alerts
    assert first.frozen == []  # nothing reused yet
    train(model, 10, monitor, optimizer)
    snap = monitor.last_snapshot
    assert not snap.alerts, [a.message for a in snap.alerts]
    q = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    assert snap.roles[q].component == "q" and snap.roles[q].klass == "selection" and q in snap.adapted
    assert snap.matrices[q].metric_key == "weibull/k/L0/q"  # the same key as the model without adapters
    # the adapted matrix trains with the factors' optimizer group: eta and lambda_wd known, T/tau too
    assert snap.matrices[q].lr == pytest.approx(3e-3) and snap.matrices[q].weight_decay == pytest.approx(0.1)
    assert snap.T_over_tau == pytest.approx(10 * 3e-3 * 0.1)
    # frozen, not adapted: fitted once, the same fit object every later snapshot
    o = "base_model.model.model.layers.0.self_attn.o_proj.weight"
    assert o in snap.frozen and snap.fits[o] is first.fits[o] and q not in snap.frozen
    assert snap.aggregates[keys.FROZEN_MATRICES] == len(snap.frozen)
    # the factors are reported apart: own keys, in no class aggregate
    assert snap.aggregates["weibull/lora/L0/q/A"] == pytest.approx(
        snap.adapter_fits["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"].k
    )
    assert "weibull/lora/L1/v/B" in snap.aggregates
    assert not [k for role in snap.roles.values() for k in [role.component] if k.startswith("lora")]
    # a frozen matrix written in place is fitted again
    with torch.no_grad():
        dict(model.named_parameters())[o].mul_(2.0)
    again = monitor.snapshot(11)
    assert o not in again.frozen and again.fits[o].scale == pytest.approx(2 * snap.fits[o].scale, rel=1e-3)


def test_keys_and_display_names_do_not_see_the_wrapper():
    plain = keys.matrix_metric_keys(model_roles(tiny_llama()))
    wrapped_model = lora(tiny_llama(), targets=["q_proj", "v_proj"])
    roles = Adapters(wrapped_model).without_factors(model_roles(wrapped_model))
    wrapped = keys.matrix_metric_keys(roles)
    assert sorted(wrapped.values()) == sorted(plain.values())


def test_hf_trainer_and_lightning_callbacks_monitor_the_effective_weights(tmp_path):
    from transformers import Trainer, TrainingArguments

    from weibull_monitor.demos.toy import ByteWindowDataset
    from weibull_monitor.integrations.hf import WeibullCallback

    model = lora(tiny_llama(), targets=["q_proj", "v_proj"])
    callback = WeibullCallback(every=2, store=tmp_path / "hf.sqlite")
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        weight_decay=0.1,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    dataset = ByteWindowDataset(n_samples=8, seq_len=16)
    Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback]).train()
    check_store(tmp_path / "hf.sqlite")

    pl = pytest.importorskip("lightning.pytorch")
    from weibull_monitor.integrations.lightning import WeibullCallback as LightningCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = lora(tiny_llama(), targets=["q_proj", "v_proj"])

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)

    lightning = LightningCallback(every=2, store=tmp_path / "pl.sqlite")
    trainer = pl.Trainer(
        default_root_dir=str(tmp_path / "pl"),
        max_steps=4,
        accelerator="cpu",
        logger=False,
        callbacks=[lightning],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    loader = torch.utils.data.DataLoader(ByteWindowDataset(n_samples=8, seq_len=16), batch_size=2)
    trainer.fit(Module(), loader)
    check_store(tmp_path / "pl.sqlite")


def check_store(path):
    """The run store of a callback run: effective q/v fits under their plain keys, the adapters' optimizer group,
    the factors apart, no alert."""
    from weibull_monitor.store import RunStore

    with RunStore(path) as store:
        assert store.steps() == [0, 2, 4] and not store.alerts()
        fits = {f["name"]: f for f in store.fits(step=4)}
        adapted = [f for name, f in fits.items() if ".base_layer" in name]
        assert len(adapted) == 4 and {f["metric_key"] for f in adapted} == {
            "weibull/k/L0/q",
            "weibull/k/L0/v",
            "weibull/k/L1/q",
            "weibull/k/L1/v",
        }
        assert all(f["weight_decay"] == pytest.approx(0.1) and f["ok"] for f in adapted)
        assert not [name for name in fits if ".lora_" in name]
        metrics = {a["metric"] for a in store.aggregates(step=4)}
        assert "weibull/frozen_matrices" in metrics and not [m for m in metrics if m.startswith("weibull/lora/")]
        # the factors are fitted at every 5th snapshot (adapter_factors_every): the first one here
        assert "weibull/lora/L0/q/A" in {a["metric"] for a in store.aggregates(step=0)}


def test_scan_reads_merged_and_adapter_checkpoints(tmp_path):
    from weibull_monitor.offline.scan import scan_path

    model = lora(tiny_llama(), targets=["q_proj", "v_proj"])
    train(model, 3)
    model.save_pretrained(tmp_path / "adapter")  # adapter_model.safetensors + adapter_config.json
    copy.deepcopy(model).merge_and_unload().save_pretrained(tmp_path / "merged")
    (merged,) = scan_path(tmp_path / "merged", progress=False)
    q = "model.layers.0.self_attn.q_proj.weight"
    effective = effective_weight(find_adapters(model)["base_model.model." + q.replace("q_proj", "q_proj.base_layer")])
    assert merged.roles[q].component == "q"
    assert abs(merged.fits[q].k - fit_weibull(effective).k) < 1e-6
    (adapter,) = scan_path(tmp_path / "adapter", progress=False)
    factors = [k for k in adapter.fits if ".lora_" in k]
    assert len(factors) == 8 and all(adapter.roles[k].klass == "other" for k in factors)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 8


def test_qlora_4bit_base_where_bitsandbytes_runs(tmp_path):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed: QLoRA needs it")
    del bnb
    tiny_llama().save_pretrained(tmp_path / "base")
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    try:
        base = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "base", quantization_config=quantization, device_map="cpu"
        )
    except Exception as error:  # a bitsandbytes build without a CPU backend
        pytest.skip(f"bitsandbytes cannot load a 4-bit model on this CPU: {error}")
    model = lora(base, targets=["q_proj", "v_proj"])
    monitor = WeibullMonitor(model, every=2, store=None)
    train(model, 4, monitor)
    snap = monitor.last_snapshot
    assert not snap.skipped, snap.skipped
    assert len(snap.adapted) == 4 and all(snap.fits[k].ok for k in snap.adapted)
    # the frozen 4-bit matrices are dequantized and fitted once
    o = "base_model.model.model.layers.0.self_attn.o_proj.weight"
    assert snap.fits[o].ok and o in snap.frozen
