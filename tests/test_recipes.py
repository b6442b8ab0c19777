"""Each method trained and sampled as its authors published: EDM2's learning-rate schedule and power-function EMA,
DiT's and EDM2's unclipped steps, the recipe every plan records, and the guidance rule of `ulbench validate`."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from ul_model.ema import PowerFunctionEMA, exp_to_std, power_ema_beta, std_to_exp
from ul_model.train import TrainConfig, lr_at, train
from ulbench.methods import get_kind
from ulbench.methods.base import recipe

FASHION = str(Path(__file__).resolve().parents[1] / "suites" / "fashion-mnist.yaml")


def _train_config(kind: str, preset: str, **changes) -> TrainConfig:
    k = get_kind(kind)
    fields = recipe(k, k.resolve(preset, {}), "stage2", {}, seed=0)
    return dataclasses.replace(TrainConfig(**{**fields, "betas": tuple(fields["betas"]),
                                               "ema_stds": tuple(fields["ema_stds"])}), **changes)


def test_edm2_learning_rate_is_edm2s_formula_at_given_steps():
    """EDM2 (training_loop.py): lr = alpha_ref / sqrt(max(t / (t_ref batch), 1)) * min(t / rampup, 1), t the images
    seen before the step; edm2-xs: alpha_ref 0.012, t_ref 70k batches of 2048, ramp-up 10 Mimg."""
    cfg = _train_config("edm2", "edm2-xs")
    assert (cfg.lr, cfg.batch_size, cfg.lr_decay_batches, cfg.lr_rampup_images) == (0.012, 2048, 70_000, 10e6)

    def edm2(nimg):
        return 0.012 / math.sqrt(max(nimg / (70_000 * 2048), 1)) * min(nimg / 10e6, 1)

    for step in (0, 1, 1000, 4882, 4883, 10_000, 70_000, 280_000, 1_000_000):
        assert lr_at(step, cfg) == pytest.approx(edm2(step * 2048), rel=1e-12, abs=0)
    assert lr_at(0, cfg) == 0.0  # EDM2's first step has no learning rate (t = 0)
    assert lr_at(2441, cfg) == pytest.approx(0.012 * 2441 * 2048 / 10e6)  # half-way up the ramp
    assert lr_at(4 * 70_000, cfg) == pytest.approx(0.012 / 2)  # t = 4 t_ref: 1 / sqrt(4)


def test_dit_learning_rate_is_constant():
    cfg = _train_config("dit", "dit-xl-2")
    assert {lr_at(s, cfg) for s in (0, 1, 10, 10**6)} == {1e-4}
    assert (cfg.batch_size, cfg.ema_decay, cfg.ema_stds, cfg.betas) == (256, 0.9999, (), (0.9, 0.999))


def test_power_function_ema_values_equal_edm2s_formulas():
    """gamma from sigma_rel (EDM2 Algorithm 2): 0.05 -> 16.97 and 0.10 -> 6.94 as the paper states; beta at given
    image counts is (1 - batch / t)^(gamma + 1) (eq. 127); averaging p(t) = t gives T (gamma + 1) / (gamma + 2)."""
    assert std_to_exp(0.05) == pytest.approx(16.97, abs=0.01) and std_to_exp(0.10) == pytest.approx(6.94, abs=0.01)
    for std in (0.05, 0.10, 0.2):
        assert exp_to_std(std_to_exp(std)) == pytest.approx(std, rel=1e-6)
    g = std_to_exp(0.10)
    for nimg, batch in ((2048, 2048), (4096, 2048), (2048 * 1000, 2048), (640, 32)):
        assert power_ema_beta(0.10, nimg, batch) == pytest.approx((1 - batch / nimg) ** (g + 1), rel=1e-12)
    net = torch.nn.Linear(1, 1, bias=False)
    ema = PowerFunctionEMA(net, stds=(0.05, 0.10))
    T = 2000
    for t in range(1, T + 1):
        with torch.no_grad():
            net.weight.fill_(float(t))
        ema.update(net, nimg=t, batch_size=1)
    averages = ema.averages()
    for std, name in ((0.05, "ema"), (0.10, "ema-std0.100")):
        gamma = std_to_exp(std)
        assert averages[name]["weight"].item() == pytest.approx(T * (gamma + 1) / (gamma + 2), rel=0.01)


class _Quadratic(torch.nn.Module):
    """loss = 1e4 * |w - target|^2 per sample: gradient norms in the thousands, far above any clip."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(8))

    def forward(self, x):
        return 1e4 * (self.w - x).square().sum(1)


def _seen_gradient_norms(cfg: TrainConfig, tmp_path, monkeypatch) -> tuple[list[float], list[dict]]:
    """The gradient norm the optimizer's step sees, and the loop's logged rows, over cfg.steps steps."""
    seen = []
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        seen.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for g in self.param_groups
                                                                 for p in g["params"]]))))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    data = torch.randn(64, 8)
    log = train(_Quadratic(), lambda net, b: {"loss": net(b[0])},
                lambda start: iter([(data[i % 8 * 8:(i % 8 + 1) * 8],) for i in range(start, cfg.steps)]),
                cfg, tmp_path, progress=False)
    return seen, log


@pytest.mark.parametrize("kind,preset", [("dit", "dit-tiny"), ("edm2", "edm2-tiny")])
def test_dit_and_edm2_steps_are_not_clipped(kind, preset, tmp_path, monkeypatch):
    cfg = _train_config(kind, preset, steps=3, batch_size=8, log_every=1, checkpoint_every=0)
    assert cfg.grad_clip == 0.0
    seen, log = _seen_gradient_norms(cfg, tmp_path, monkeypatch)
    assert min(seen) > 100 and seen == pytest.approx([r["grad_norm"] for r in log], rel=1e-6)
    clipped, _ = _seen_gradient_norms(dataclasses.replace(cfg, grad_clip=1.0), tmp_path / "clip", monkeypatch)
    assert clipped == pytest.approx([1.0] * 3, rel=1e-5)  # what the shared loop did to them before


def test_power_ema_through_the_training_loop_resumes_bit_for_bit(tmp_path):
    """EDM2's recipe in the shared loop: one file per EMA profile; a resumed run's averages equal an uninterrupted
    run's (time is counted in images, so it must survive the restart)."""
    from safetensors.torch import load_file

    cfg = _train_config("edm2", "edm2-tiny", steps=6, batch_size=8, checkpoint_every=3, ema_stds=(0.10, 0.05))
    data = torch.randn(64, 8)

    def batches(start):
        return iter([(data[i % 8 * 8:(i % 8 + 1) * 8],) for i in range(start, cfg.steps)])

    def loss_fn(net, b):
        return {"loss": net(b[0])}

    torch.manual_seed(0)
    train(_Quadratic(), loss_fn, batches, cfg, tmp_path / "a", progress=False)
    torch.manual_seed(0)
    train(_Quadratic(), loss_fn, batches, dataclasses.replace(cfg, steps=3), tmp_path / "b", progress=False)
    train(_Quadratic(), loss_fn, batches, cfg, tmp_path / "b", resume=True, progress=False)
    for name in ("ema", "ema-std0.050"):
        a, b = (load_file(str(tmp_path / r / "checkpoint-00000006" / f"{name}.safetensors")) for r in "ab")
        assert torch.equal(a["w"], b["w"]), name
    weights = load_file(str(tmp_path / "a" / "checkpoint-00000006" / "weights.safetensors"))["w"]
    ema = load_file(str(tmp_path / "a" / "checkpoint-00000006" / "ema.safetensors"))["w"]
    assert not torch.equal(ema, weights) and ema.abs().sum() > 0  # averaged, not a copy and not the init


def test_every_plan_records_its_full_recipe_and_the_published_one(tmp_path):
    """config.json: the TrainConfig fields each stage trains with (suite settings over the kind's published
    recipe), the sampler and guidance; the report's recipes table marks where they differ from the published."""
    from ulbench.report import recipes_table
    from ulbench.suite import load_suite
    from ulbench.run.directory import create_run

    run = create_run(FASHION, ["dataset.name=photos", "dataset.class_conditional=false", "evaluation.guidance=[1.0]",
                               "evaluation.metrics=[fid]"], tmp_path, "r")
    config = json.loads((run / "config.json").read_text())
    edm2, dit = config["methods"]["sd-edm2"], config["methods"]["sd-dit"]
    assert edm2["train"]["stage2"]["grad_clip"] == 0.0 and dit["train"]["stage2"]["grad_clip"] == 0.0
    assert edm2["train"]["stage2"]["ema_stds"] == [] and edm2["train"]["stage2"]["ema_decay"] == 0.999  # the suite's
    assert set(dataclasses.asdict(TrainConfig())) - {"steps", "precision"} == set(edm2["train"]["stage2"])
    from ulbench.methods.base import stage_train_config

    assert stage_train_config(edm2["train"], "stage2", 10, "bf16").precision == "bf16"  # the suite's precision
    assert edm2["sampler"] == {"steps": 32} and dit["sampler"] == {"steps": 250}
    assert config["methods"]["ul"]["sampler"]["steps"] == 32  # the suite's evaluation.sampler
    assert dit["published"]["train"]["stage2"]["lr"] == 1e-4 and dit["published"]["train"]["stage1"] == {}
    table = recipes_table(config).set_index(["method", "stage"])
    assert table.loc[("sd-dit", "stage2"), "lr schedule"] == ("0.001, warm-up 100 steps "
                                                              "(published: 0.0001 constant)")
    assert table.loc[("sd-dit", "stage2"), "grad clip"] == "none"
    assert table.loc[("sd-dit", "stage2"), "as published"] == "no"
    assert table.loc[("ul", "stage1"), "as published"] == "-"
    assert table.loc[("sd-edm2", "stage2"), "sampler"] == "steps 32"
    assert load_suite(FASHION).methods[2].sampler == {"steps": 32}


GUIDED = """version: 1
dataset: {name: photos, resolution: 32, class_conditional: %s}
methods:
  - {name: m, kind: %s, preset: %s%s}
compute: {ladder: [1.0e12]}
evaluation: {guidance: [1.0, 2.0]}
"""


@pytest.mark.parametrize("kind,preset,overrides,error", [
    ("edm2", "edm2-s", "", "never trains"),
    ("edm2", "edm2-tiny", ", overrides: {backbone: {label_dropout: 0.0}}", "never trains"),
    ("dit", "dit-tiny", ", overrides: {backbone: {label_dropout: 0.0}}", "never trains"),
    ("ul", "ul-tiny", ", overrides: {diffusion: {label_dropout: 0.0}}", "never trains"),
    ("dit", "dit-tiny", "", None),
    ("edm2", "edm2-tiny", "", None),
    ("ul", "ul-tiny", "", None),
    ("edm2", "edm2-s", ", guidance: [1.0]", None),
])
def test_validate_refuses_guidance_of_a_never_trained_unconditional_branch(tmp_path, kind, preset, overrides, error):
    from ulbench.suite import load_suite
    from ulbench.suite.schema import SuiteError

    path = tmp_path / "s.yaml"
    path.write_text(GUIDED % ("true", kind, preset, overrides))
    if error is None:
        assert load_suite(path).methods[0].guidance in ((1.0, 2.0), (1.0,))
        return
    with pytest.raises(SuiteError) as e:
        load_suite(path)
    assert error in str(e.value) and "evaluation.guidance[1]" in str(e.value) and "guidance: [1.0]" in str(e.value)


def test_validate_refuses_guidance_without_labels(tmp_path):
    from ulbench.suite import load_suite
    from ulbench.suite.schema import SuiteError

    path = tmp_path / "s.yaml"
    path.write_text(GUIDED % ("false", "ul", "ul-tiny", ""))
    with pytest.raises(SuiteError, match="needs class labels"):
        load_suite(path)


def test_method_sampler_keys_are_the_kinds(tmp_path):
    from ulbench.suite import load_suite
    from ulbench.suite.schema import SuiteError

    path = tmp_path / "s.yaml"
    path.write_text(GUIDED % ("true", "dit", "dit-tiny", ", sampler: {steps: 20}"))
    assert load_suite(path).methods[0].sampler == {"steps": 20}
    path.write_text(GUIDED % ("true", "dit", "dit-tiny", ", sampler: {method: ddim}"))
    with pytest.raises(SuiteError, match="method"):
        load_suite(path)
    path.write_text(GUIDED % ("true", "ul", "ul-tiny", ", sampler: {guidance_interval: [2.0, -1.0]}"))
    with pytest.raises(SuiteError, match="not below"):
        load_suite(path)
    path.write_text(GUIDED % ("true", "ul", "ul-tiny", ", sampler: {guidance_interval: [-1, 2.5]}"))
    assert load_suite(path).methods[0].sampler["guidance_interval"] == [-1.0, 2.5]


def test_the_sampler_is_part_of_a_results_protocol_identity():
    """`ulbench check` calls a change of sampler (steps, guidance interval) a PROTOCOL change, not a regression."""
    from ulbench.io import fingerprint_id

    fid = {"id": "abc", "inputs": ["x"]}
    a = fingerprint_id({**fid, "sampler": {"steps": 32, "guidance_interval": None}})
    b = fingerprint_id({**fid, "sampler": {"steps": 32, "guidance_interval": [-1.0, 2.0]}})
    assert a != b and a.startswith("abc") and fingerprint_id(fid) == "abc"


def test_class_acc_needs_labels_and_a_labelled_reference(tmp_path):
    from ulbench.suite import load_suite
    from ulbench.suite.schema import SuiteError

    path = tmp_path / "s.yaml"
    text = ("version: 1\ndataset: {name: photos, resolution: 32, class_conditional: %s}\n"
            "methods: [{name: m, preset: ul-tiny}]\ncompute: {ladder: [1.0e12]}\n"
            "evaluation: {metrics: [fid, class_acc]%s}\n")
    path.write_text(text % ("true", ""))
    assert load_suite(path).evaluation.metrics == ("fid", "class_acc")
    path.write_text(text % ("false", ""))
    with pytest.raises(SuiteError, match="needs class labels"):
        load_suite(path)
    path.write_text(text % ("true", ", reference: /x/ref.npz"))
    with pytest.raises(SuiteError, match="labelled reference"):
        load_suite(path)
    path.write_text(text.replace("evaluation: {metrics: [fid, class_acc]%s}\n", "") % "true")
    assert "class_acc" in load_suite(path).evaluation.metrics  # in the default list of a class-conditional suite
    path.write_text(text.replace("evaluation: {metrics: [fid, class_acc]%s}\n", "") % "false")
    assert "class_acc" not in load_suite(path).evaluation.metrics
