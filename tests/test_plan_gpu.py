"""GPU-hour plans (`ulbench run SUITE --dry-run --gpu`): closed forms of the hours, CFG doubling, call counts that
match the samplers, the Inception count, and the flags' errors. Shapes only (meta device) except the tiny samplers."""
from __future__ import annotations

import pytest
import torch

from ulbench.cli import main
from ulbench.run.plan import format_plan, make_plan
from ulbench.run.plan_gpu import (DEFAULT_MFU, Extractor, format_gpu_plan, gpu_options, inception_flops, load_gpus,
                              method_hours)
from ulbench.suite import load_suite

H100_BF16_DENSE = 989.4e12  # FLOP/s, NVIDIA H100 SXM datasheet (1,979 TFLOPS with sparsity)


@pytest.fixture(scope="module")
def smoke():
    """The smoke suite (ul-tiny, dit-tiny) with a second, guided sample set."""
    suite = load_suite("suites/smoke.yaml", ["evaluation.guidance=[1.0,2.0]", "dataset.class_conditional=true"])
    return suite, make_plan(suite)


def test_gpu_table_holds_the_datasheet_peaks():
    gpus = load_gpus()
    assert {n: g.peak_flops for n, g in gpus.items()} == {"h100": 989.4e12, "h200": 989.4e12, "a100": 312e12}
    assert all("datasheet" in g.source and "sparsity" in g.source for g in gpus.values())


def test_training_hours_are_the_measured_flops_over_peak_times_mfu(smoke):
    suite, plans = smoke
    opts = gpu_options("h100", None, None)
    assert (opts.gpus, opts.mfu) == (1, DEFAULT_MFU)
    for plan in plans:
        m = method_hours(suite, plan, Extractor("Inception", 0.0))
        assert [p.point for p in m.points] == ["stage1", "b0", "b1"]
        # rung increments add up to the plan's training FLOPs at the last rung (stage 1 once, stage 2 continued)
        assert m.train_flops == pytest.approx(plan.train_flops(len(plan.rung_steps) - 1)["total"], rel=1e-12)
        b1 = plan.flops_per_step("stage2") * (plan.rung_steps[1] - plan.rung_steps[0])
        assert m.points[2].train_flops == b1
        assert opts.gpu_hours(b1) == pytest.approx(b1 / (H100_BF16_DENSE * DEFAULT_MFU) / 3600, rel=1e-12)


def _totals_row(text: str, name: str) -> list[float]:
    row = next(line for line in text.splitlines() if line.split()[:1] == [name] and "->" not in line)
    return [float(v.replace(",", "")) for v in row.split()[1:]]


def test_more_gpus_shorten_the_wall_clock_not_the_gpu_hours(smoke):
    suite, plans = smoke
    two, four = (format_gpu_plan(suite, plans, gpu_options("h100", n, 0.5)) for n in (2, 4))
    train, evaluation, total, wall = _totals_row(two, "all")
    assert _totals_row(four, "all") == pytest.approx([train, evaluation, total, wall / 2], rel=1e-2)
    assert wall == pytest.approx(total / 2, rel=1e-2)
    closed_form = sum(p.train_flops(len(p.rung_steps) - 1)["total"] for p in plans) / (H100_BF16_DENSE * 0.5) / 3600
    assert train == pytest.approx(closed_form, rel=1e-2)  # the table prints 3 significant digits


def test_guidance_doubles_the_sampling_network_only(smoke):
    """Guidance 2 adds one unconditional pass of the stage-2 network per sampler evaluation, nothing else; its
    FLOPs per pass are the plan's measured stage-2 forward (2 x multiply-adds)."""
    suite, plans = smoke
    evaluations = {"ul": suite.evaluation.sampler["steps"] + 1, "dit": suite.evaluation.sampler["steps"]}
    for plan in plans:
        m = method_hours(suite, plan, Extractor("Inception", 0.0))
        extra = m.per_sample[2.0] - m.per_sample[1.0]
        assert extra == pytest.approx(evaluations[plan.kind] * 2 * plan.forward_macs_per_image["stage2"], rel=1e-9)
        assert m.points[1].eval_flops == suite.evaluation.num_samples * (m.per_sample[1.0] + m.per_sample[2.0])


def _rows_per_image(module: torch.nn.Module, run) -> int:
    """Rows of input ``module`` sees while ``run()`` generates one image (a batched CFG pass counts 2)."""
    rows = []
    handle = module.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    try:
        run()
    finally:
        handle.remove()
    return sum(rows)


@pytest.mark.parametrize("preset", ["ul-tiny", "dit-tiny", "edm2-tiny"])
@pytest.mark.parametrize("guidance", [1.0, 1.5])
def test_call_counts_are_what_the_samplers_run(preset, guidance, one_thread):
    """The calls per image that a plan multiplies by are counted on the real samplers (tiny models, 3 steps)."""
    from ulbench.methods import kind_of_preset

    kind = kind_of_preset(preset)
    config = kind.resolve(preset, {}, num_classes=10)
    sampler = {"method": "ancestral", "steps": 3, "decoder_steps": 2}
    calls = {c.name: c for c in kind.evaluation_calls(config, sampler, 2, "meta")["sample"]}
    torch.manual_seed(0)
    labels = torch.zeros(1, dtype=torch.long)
    if kind.name == "ul":
        from ul_model.model import UnifiedLatents

        model = UnifiedLatents(config).eval()
        run = lambda: model.generate([0], labels, steps=3, decoder_steps=2, guidance=guidance)  # noqa: E731
        networks = {"base model": model.base, "decoder": model.decoder}
    else:
        family = kind._module()
        model = family.build(config.backbone).eval()
        run = lambda: family.generate(model, config.backbone, [0], labels, guidance, 3)  # noqa: E731
        networks = {kind.family: model}
    for name, module in networks.items():
        passes = 2 if calls[name].guided and guidance != 1 else 1
        assert _rows_per_image(module, run) == passes * calls[name].per_image, name


def test_inception_count_matches_torchvision():
    from torchvision.models import Inception_V3_Weights

    # torchvision's published Inception-v3 cost is in multiply-adds ("GFLOPS" 5.713); FLOPs = 2 x multiply-adds
    published_macs = Inception_V3_Weights.IMAGENET1K_V1.meta["_ops"] * 1e9
    assert inception_flops(32) / 2 == pytest.approx(published_macs, rel=0.01)
    assert inception_flops(64) == inception_flops(32)  # resized to 299 first


def test_dry_run_prints_todays_plan_then_the_gpu_hours(smoke, capsys):
    suite, plans = smoke
    rc = main(["run", "suites/smoke.yaml", "--set", "evaluation.guidance=[1.0,2.0]", "--set",
               "dataset.class_conditional=true", "--dry-run", "--no-timing", "--gpu", "h200", "--gpus", "8"])
    out = capsys.readouterr().out
    assert rc == 0
    before, gpu_plan = out.split("GPU plan on h200")
    assert before == format_plan(suite, plans, "cpu") + "\n"  # what a dry run prints without --gpu
    assert "GPU-hours = FLOPs / (peak x MFU) / 3600, MFU 0.4" in gpu_plan
    assert "wall-clock hours = GPU-hours / 8 GPUs" in gpu_plan
    assert "per sample at guidance 2: base model 2 x 33 x" in gpu_plan


@pytest.mark.parametrize("flags, message", [
    (["--gpu", "v100"], "--gpu v100: unknown GPU; known: h100, h200, a100"),
    (["--gpu", "h100", "--mfu", "0"], "--mfu 0"),
    (["--gpu", "h100", "--mfu", "1.5"], "--mfu 1.5"),
    (["--gpu", "h100", "--gpus", "0"], "--gpus 0"),
    (["--gpus", "64"], "--gpus and --mfu need --gpu NAME"),
])
def test_bad_gpu_flags_exit_2_naming_the_flag(flags, message, capsys):
    assert main(["run", "suites/smoke.yaml", "--dry-run", "--no-timing", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
