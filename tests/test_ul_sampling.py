"""Samplers against the Gaussian closed form, per-sample seeds, and guidance."""
import math

import pytest
import torch

from test_ul_losses import gaussian_denoiser
from ul_model.sampling import SampleNoise, guided, sample
from ul_model.schedules import LogSNRSchedule, alpha_sigma

S, D, N = 0.7, 4, 4000


def _final_variance(lambda_max: float) -> float:
    # x_hat = E[x | z_0] at lambda_max: Var = s^2 * alpha^2 s^2 / (alpha^2 s^2 + sigma^2) (exact marginal at t = 0)
    a, s = (float(v) for v in alpha_sigma(torch.tensor(lambda_max, dtype=torch.float64)))
    return S**2 * a**2 * S**2 / (a**2 * S**2 + s**2)


@pytest.mark.parametrize("method", ["ancestral", "ddim"])
def test_sampler_output_variance_matches_closed_form(method):
    # With the exact denoiser both samplers converge to the data distribution as steps grow; with few steps they
    # under-disperse (measured, ancestral: var 0.405 at 25 steps, 0.444 at 50, 0.476 at 200, expected 0.483).
    steps, rel = 400, 0.04  # rel: ~3.5 standard errors of a variance estimated from N * D = 16000 values
    schedule = LogSNRSchedule(-10.0, 5.0)
    noise = SampleNoise(range(N), (D,), dtype=torch.float64)
    out = sample(gaussian_denoiser(S), schedule, steps, noise, method=method)
    expected = _final_variance(5.0)
    assert out.var().item() == pytest.approx(expected, rel=rel)
    assert expected == pytest.approx(S**2, rel=0.02)  # at lambda 5 the final denoising shrinks s^2 by ~1.4%
    assert abs(out.mean().item()) < 4 * math.sqrt(S**2 / (N * D))
    coarse = sample(gaussian_denoiser(S), schedule, 25, SampleNoise(range(N), (D,), dtype=torch.float64), method=method)
    assert coarse.var().item() < out.var().item()  # discretization error shrinks with more steps


def test_wrong_posterior_variance_is_caught():
    # A sampler with no injected noise in the ancestral step collapses the variance: the closed form catches it.
    schedule = LogSNRSchedule(-10.0, 5.0)

    class NoNoise(SampleNoise):
        def draw(self):
            first = getattr(self, "_first", True)
            self._first = False
            return super().draw() if first else torch.zeros(len(self), *self.shape, dtype=self.dtype)

    out = sample(gaussian_denoiser(S), schedule, 50, NoNoise(range(N), (D,), dtype=torch.float64))
    assert out.var().item() < 0.7 * _final_variance(5.0)


@pytest.mark.parametrize("method", ["ancestral", "ddim"])
def test_samples_do_not_depend_on_batch_size(method):
    schedule = LogSNRSchedule(-10.0, 5.0)
    seeds = list(range(100, 108))
    batch = sample(gaussian_denoiser(S), schedule, 20, SampleNoise(seeds, (3, 4, 4)), method=method)
    singles = torch.cat([sample(gaussian_denoiser(S), schedule, 20, SampleNoise([s], (3, 4, 4)), method=method)
                         for s in seeds])
    torch.testing.assert_close(batch, singles, rtol=1e-6, atol=1e-6)
    other = sample(gaussian_denoiser(S), schedule, 20, SampleNoise([0], (3, 4, 4)), method=method)
    assert not torch.allclose(other, batch[:1])


def test_guidance_scale_and_interval():
    def cond(z, lam, labels):
        return torch.zeros_like(z) if labels is None else torch.ones_like(z)  # v_u = 0, v_c = 1

    z = torch.zeros(3, 2)
    lam = torch.tensor([-5.0, 0.0, 4.0])
    assert torch.equal(guided(cond, torch.ones(3), 1.0)(z, lam), torch.ones(3, 2))
    assert torch.equal(guided(cond, torch.ones(3), 3.0)(z, lam), torch.full((3, 2), 3.0))
    out = guided(cond, torch.ones(3), 3.0, interval=(-1.0, 1.0))(z, lam)
    assert out[:, 0].tolist() == [1.0, 3.0, 1.0]  # guided only inside the interval, plain conditional outside


def _recording_cond(calls: list):
    """A conditional network v = -0.3 z + 0.2 [labels given]: records (logsnr, conditional?) for every pass."""

    def cond(z, lam, labels):
        calls.append((float(lam[0]), labels is not None))
        return -0.3 * z + (0.0 if labels is None else 0.2)

    return cond


def test_guidance_interval_applies_guidance_only_at_steps_inside_it():
    schedule, steps, labels = LogSNRSchedule(-10.0, 5.0), 10, torch.ones(3)
    lams = schedule.logsnr(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)).tolist()  # the steps' lambda_t
    lo, hi = -4.0, 1.0

    def run(scale, interval, calls):
        noise = SampleNoise(range(3), (2, 4), dtype=torch.float64)
        return sample(guided(_recording_cond(calls), labels, scale, interval), schedule, steps, noise)

    calls = []
    out = run(3.0, (lo, hi), calls)
    inside = [lam for lam in lams if lo <= lam <= hi]
    assert 0 < len(inside) < steps
    assert [lam for lam, c in calls if not c] == pytest.approx(inside)  # the unconditional pass: inside only
    assert [lam for lam, c in calls if c] == pytest.approx(lams)  # one conditional pass per step, plus the final one
    plain = run(1.0, None, [])
    assert not torch.equal(out, plain)
    # An interval holding no step's lambda is plain conditional sampling, bit for bit, one pass per step.
    calls = []
    assert torch.equal(run(3.0, (5.5, 9.0), calls), plain) and all(c for _, c in calls)
    # No interval: guidance at every step, v = v_u + w (v_c - v_u) exactly as before the interval existed.
    calls, z, lam = [], torch.randn(3, 2, 4, dtype=torch.float64), torch.full((3,), -2.0, dtype=torch.float64)
    v_c, v_u = -0.3 * z + 0.2, -0.3 * z
    assert torch.equal(guided(_recording_cond(calls), labels, 3.0)(z, lam), v_u + 3.0 * (v_c - v_u))
    assert torch.equal(run(3.0, (-math.inf, math.inf), []), run(3.0, None, []))


def test_ddim_step_uses_eps_recomputed_from_the_clipped_x_hat():
    # With x_hat clipped, DDIM's pair must satisfy z_t = alpha_t x_hat + sigma_t eps_hat: eps_hat is recomputed
    # (z_t - alpha_t x_hat) / sigma_t; keeping the network's eps_hat would step from a point that is not z_t.
    schedule, seen = LogSNRSchedule(-10.0, 5.0), []

    def denoise(z, lam):
        seen.append(z.clone())
        return torch.full_like(z, -3.0)  # x_hat = alpha z + 3 sigma: above 1 at the noisy end, so it is clipped

    noise = SampleNoise(range(4), (5,), dtype=torch.float64)
    sample(denoise, schedule, 2, noise, method="ddim", clip_x=1.0)
    z_1 = SampleNoise(range(4), (5,), dtype=torch.float64).draw()
    torch.testing.assert_close(seen[0], z_1, rtol=0, atol=0)
    lam_t, lam_s = schedule.logsnr(torch.tensor([1.0, 0.5], dtype=torch.float64))
    (a_t, s_t), (a_s, s_s) = alpha_sigma(lam_t), alpha_sigma(lam_s)
    x_raw = a_t * z_1 + 3.0 * s_t
    assert (x_raw > 1).all()  # every entry is clipped
    x_hat = x_raw.clamp(-1.0, 1.0)
    eps_hat = (z_1 - a_t * x_hat) / s_t
    torch.testing.assert_close(seen[1], a_s * x_hat + s_s * eps_hat, rtol=1e-12, atol=1e-12)
    unclipped_eps = s_t * z_1 + a_t * -3.0  # eps_from_v of the raw prediction
    assert not torch.allclose(seen[1], a_s * x_hat + s_s * unclipped_eps, rtol=1e-6, atol=1e-6)
