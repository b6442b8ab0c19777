"""UL losses against closed forms on Gaussian data (I-MMSE), and the parametrization identities."""
import math

import pytest
import torch

from ul_model.losses import (base_loss, bits_per_latent_dim, decoder_loss, encode_z0, endpoint_kl, prior_loss)
from ul_model.parametrization import eps_from_v, v_from_x, v_target, x_from_eps, x_from_v
from ul_model.schedules import (LogSNRSchedule, alpha_sigma, dlogsnr_cosine_dt, dlogsnr_interpolated_dt,
                                logsnr_cosine, logsnr_interpolated)

D, N, S = 8, 40_000, 0.7  # latent dims, Monte-Carlo samples, data std


def gaussian_denoiser(s: float):
    """Bayes-optimal v-prediction for x ~ N(0, s^2 I): x_hat = alpha s^2 / (alpha^2 s^2 + sigma^2) z_t."""

    def denoise(z_t, lam):
        alpha, sigma = (a.reshape(-1, *([1] * (z_t.ndim - 1))) for a in alpha_sigma(lam))
        x_hat = alpha * s**2 / (alpha**2 * s**2 + sigma**2) * z_t
        return v_from_x(z_t, x_hat, alpha, sigma)

    return denoise


def _kl_normal(var: float) -> float:
    return 0.5 * (var - math.log(var) - 1)


def _within_3_se(samples: torch.Tensor, expected: float) -> bool:
    se = samples.std().item() / math.sqrt(len(samples))
    return abs(samples.mean().item() - expected) < 3 * se


def _prior_expected(schedule: LogSNRSchedule) -> float:
    # d * [0.5 log(1 + s^2 e^lambda_max) + KL(N(0, alpha_1^2 s^2 + sigma_1^2) || N(0, 1))]
    a1_sq = 1 / (1 + math.exp(-schedule.lambda_min))
    return D * (0.5 * math.log1p(S**2 * math.exp(schedule.lambda_max)) + _kl_normal(a1_sq * S**2 + 1 - a1_sq))


@pytest.fixture(params=[(D,), (2, 2, 1, 2)], ids=["image-shaped", "video-shaped"])
def z_clean(request):
    """D latent dims per sample, flat or shaped like a clip latent (C, T, H, W): the losses sum over every dim."""
    return S * torch.randn(N, *request.param, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_prior_loss_equals_mutual_information_closed_form(z_clean):
    torch.manual_seed(1)
    schedule = LogSNRSchedule(lambda_min=-10.0, lambda_max=5.0)
    terms = prior_loss(z_clean, gaussian_denoiser(S), schedule)
    assert _within_3_se(terms.total, _prior_expected(schedule))
    assert (terms.diffusion >= 0).all() and (terms.endpoint_kl >= 0).all()


@pytest.mark.parametrize("mistake", ["positive dlambda/dt", "no dlambda/dt", "half weight"])
def test_prior_closed_form_catches_weighting_mistakes(z_clean, monkeypatch, mistake):
    torch.manual_seed(1)
    schedule = LogSNRSchedule(lambda_min=-10.0, lambda_max=5.0)
    right = schedule.dlogsnr_dt
    wrong = {"positive dlambda/dt": lambda t: -right(t), "no dlambda/dt": lambda t: -torch.ones_like(t),
             "half weight": lambda t: 0.5 * right(t)}[mistake]
    monkeypatch.setattr(LogSNRSchedule, "dlogsnr_dt", lambda self, t: wrong(t))
    terms = prior_loss(z_clean, gaussian_denoiser(S), schedule)
    assert not _within_3_se(terms.total, _prior_expected(schedule))


def test_decoder_loss_with_unit_weight_equals_closed_form(z_clean):
    torch.manual_seed(2)
    schedule = LogSNRSchedule(lambda_min=-12.0, lambda_max=8.0)
    loss = decoder_loss(z_clean, gaussian_denoiser(S), schedule, c_lf=1.0, b=60.0)  # sigmoid(60 - lambda) = 1
    # 0.5 d [log(1 + s^2 e^lambda_max) - log(1 + s^2 e^lambda_min)]: the diffusion part only, no endpoint term
    expected = 0.5 * D * (math.log1p(S**2 * math.exp(8.0)) - math.log1p(S**2 * math.exp(-12.0)))
    assert _within_3_se(loss, expected)
    assert not _within_3_se(decoder_loss(z_clean, gaussian_denoiser(S), schedule, c_lf=1.0, b=0.0), expected)


def test_sigmoid_weighted_losses_do_not_depend_on_the_schedule_shape(z_clean):
    # The weighted loss is an integral over lambda: the same endpoints with a shift-free vs shifted t-map agree.
    torch.manual_seed(3)
    a = base_loss(z_clean, gaussian_denoiser(S), LogSNRSchedule(-10.0, 5.0), b=1.0)
    t = torch.rand(N, dtype=torch.float64)

    class Linear(LogSNRSchedule):  # linear in lambda over the same endpoints, d lambda / dt = -15
        def logsnr(self, t):
            return -10.0 + 15.0 * (1 - t)

        def dlogsnr_dt(self, t):
            return torch.full_like(t, -15.0)

    b = base_loss(z_clean, gaussian_denoiser(S), Linear(-10.0, 5.0), b=1.0, t=t)
    se = math.hypot(a.std().item(), b.std().item()) / math.sqrt(N)
    assert abs(a.mean().item() - b.mean().item()) < 3 * se


def test_schedule_endpoints_derivative_and_shift():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    lam = logsnr_cosine(t, -10.0, 5.0)
    assert lam[0].item() == pytest.approx(5.0, abs=1e-9) and lam[-1].item() == pytest.approx(-10.0, abs=1e-9)
    assert (lam[1:] < lam[:-1]).all()
    tt = t[1:-1].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(logsnr_cosine(tt, -10.0, 5.0).sum(), tt)
    torch.testing.assert_close(g, dlogsnr_cosine_dt(t[1:-1], -10.0, 5.0))
    interp = logsnr_interpolated(tt, -10.0, 5.0, shift_low=1.0, shift_high=-2.0)
    (g,) = torch.autograd.grad(interp.sum(), tt)
    torch.testing.assert_close(g, dlogsnr_interpolated_dt(t[1:-1], -10.0, 5.0, 1.0, -2.0))


@pytest.mark.parametrize("lam", [-12.0, -3.0, 0.0, 2.5, 5.0, 10.0])
def test_eps_x_v_conversions_and_error_identities(lam):
    g = torch.Generator().manual_seed(int(lam * 10) + 100)
    x, eps = torch.randn(64, 5, generator=g, dtype=torch.float64), torch.randn(64, 5, generator=g, dtype=torch.float64)
    alpha, sigma = alpha_sigma(torch.tensor(lam, dtype=torch.float64))
    z_t = alpha * x + sigma * eps
    v = v_target(x, eps, alpha, sigma)
    torch.testing.assert_close(x_from_v(z_t, v, alpha, sigma), x)
    torch.testing.assert_close(eps_from_v(z_t, v, alpha, sigma), eps)
    torch.testing.assert_close(x_from_eps(z_t, eps, alpha, sigma), x, rtol=1e-6, atol=1e-6 * math.exp(-lam / 2))
    v_hat = v + 0.1 * torch.randn(v.shape, generator=g, dtype=torch.float64)  # an imperfect prediction
    x_hat, eps_hat = x_from_v(z_t, v_hat, alpha, sigma), eps_from_v(z_t, v_hat, alpha, sigma)
    e_eps = ((eps - eps_hat) ** 2).sum()
    assert e_eps.item() == pytest.approx(math.exp(lam) * ((x - x_hat) ** 2).sum().item(), rel=1e-9)
    assert e_eps.item() == pytest.approx((alpha**2 * ((v - v_hat) ** 2).sum()).item(), rel=1e-9)


def test_fixed_noise_encoding_and_bit_ceiling(z_clean):
    eps = torch.randn_like(z_clean)
    z0 = encode_z0(z_clean, 5.0, eps)
    alpha0, sigma0 = math.sqrt(1 / (1 + math.exp(-5))), math.sqrt(1 / (1 + math.exp(5)))
    torch.testing.assert_close(z0, alpha0 * z_clean + sigma0 * eps)
    assert alpha0 == pytest.approx(0.9967, abs=1e-4) and sigma0 == pytest.approx(0.082, abs=1e-3)
    # A unit-variance Gaussian latent sits exactly at the ceiling 0.5 log2(1 + e^5) ~ 3.6 bits per latent dim
    # (the endpoint KL of its marginal is 0); a narrower one (s = 0.7) carries less.
    schedule = LogSNRSchedule(-10.0, 5.0)
    ceiling = 0.5 * math.log2(1 + math.exp(5))
    assert ceiling == pytest.approx(3.6, abs=0.05)
    torch.manual_seed(4)
    unit_bits = bits_per_latent_dim(prior_loss(z_clean / S, gaussian_denoiser(1.0), schedule).total, D)
    assert _within_3_se(unit_bits, ceiling)
    narrow_bits = bits_per_latent_dim(prior_loss(z_clean, gaussian_denoiser(S), schedule).total, D).mean().item()
    assert 0 < narrow_bits < ceiling - 0.3
    assert endpoint_kl(torch.zeros(1, D), -30.0).item() == pytest.approx(0.0, abs=1e-9)


def test_loss_schedule_quantities_are_float32_under_bf16_autocast():
    # Under bf16 autocast the networks return bf16; a schedule evaluated in that dtype gave alpha_0 = 0.99609
    # instead of sqrt(sigmoid(5)) = 0.99665 and drew t in bf16 (256 distinct values in [0, 1)).
    torch.manual_seed(5)
    net = torch.nn.Linear(D, D)  # stands in for the encoder and the prior: bf16 outputs under autocast
    x, schedule, lams = torch.randn(64, D), LogSNRSchedule(-10.0, 5.0), []
    denoise = lambda z_t, lam: (lams.append(lam), net(z_t))[1]  # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_clean = net(x)
        z0 = encode_z0(z_clean, 5.0, torch.zeros(64, D))
        terms = prior_loss(z_clean, denoise, schedule)
    assert z_clean.dtype == torch.bfloat16  # the test exercises what it means to
    alpha0 = math.sqrt(1 / (1 + math.exp(-5.0)))
    assert alpha0 == pytest.approx(0.996648, abs=1e-6)
    assert z0.dtype == torch.float32
    torch.testing.assert_close(z0, alpha0 * z_clean.float(), rtol=1e-6, atol=0)
    (lam,) = lams
    assert lam.dtype == torch.float32 and terms.diffusion.dtype == terms.endpoint_kl.dtype == torch.float32
    assert len(lam.unique()) == len(lam) and lam.min() >= -10.0 and lam.max() <= 5.0
    torch.testing.assert_close(terms.endpoint_kl, endpoint_kl(z_clean.float(), -10.0), rtol=1e-6, atol=0)
