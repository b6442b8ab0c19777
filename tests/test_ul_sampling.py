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
