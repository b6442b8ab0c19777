"""LDM's first-stage objective: L1 + LPIPS + KL, plus a patch-GAN switched on after ``disc_start`` steps.

The objective of LDM's ``LPIPSWithDiscriminator`` (ldm/modules/losses/contperceptual.py; Esser et al. 2021, eq. 4-5 of
"Taming Transformers", for the adaptive weight), written per sample in the units of ``kl_vae.vae_losses`` (divided by
D = C*H*W values per image):

    nll     = |x - x_hat|_1 + perceptual_weight * D * LPIPS(x, x_hat)           (summed over the D values)
    G       = -mean_patches D_phi(x_hat)                                        (generator hinge term)
    lambda  = disc_weight * |grad_L nll| / (|grad_L G| + eps), clamped to [0, max], L = decoder.conv_out.weight
    L_vae   = (nll + kl_weight * KL + lambda * f(step) * G) / D,   f(step) = disc_factor if step >= disc_start else 0
    L_disc  = f(step) * 0.5 * (mean relu(1 - D_phi(x)) + mean relu(1 + D_phi(x_hat)))      (hinge)

LDM updates the VAE and the discriminator with two Adam optimizers of one learning rate. Here both networks are one
module (``VAEWithDiscriminator``) under the harness's single optimizer, and ``loss = L_vae + L_disc``: the VAE's
gradient comes from L_vae only (the discriminator is frozen while it scores x_hat for G) and the discriminator's from
L_disc only (it sees x_hat detached), so Adam, being per parameter, takes the same steps as LDM's two optimizers
(a shared gradient-norm clip, if the suite sets one, is the one coupling; LDM does not clip). LDM's learned output
log-variance stays at its initial 0, as in ``vae_losses``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn

from baselines.kl_vae import KLVAEConfig, from_vae_range, posterior_kl, reconstruction_error, to_vae_range

DISC_KERNEL = 4  # pix2pix NLayerDiscriminator: 4x4 convs, padding 1 [LDM / taming]
LEAKY_SLOPE = 0.2
INIT_STD = 0.02  # weights_init: conv N(0, 0.02), batch-norm scale N(1, 0.02) [taming]
MAX_DISC_MULT = 8  # channel multiplier cap: ndf * min(2**n, 8) [pix2pix]


class PatchDiscriminator(nn.Module):
    """pix2pix's PatchGAN (LDM's NLayerDiscriminator with batch norm): (B, C, H, W) -> (B, 1, h, w) patch logits."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, DISC_KERNEL, 2, 1), nn.LeakyReLU(LEAKY_SLOPE)]
        c = channels
        for n in range(1, layers + 1):  # stride 2, then one stride-1 layer; no bias before batch norm
            c_out = channels * min(2**n, MAX_DISC_MULT)
            mods += [nn.Conv2d(c, c_out, DISC_KERNEL, 2 if n < layers else 1, 1, bias=False), nn.BatchNorm2d(c_out),
                     nn.LeakyReLU(LEAKY_SLOPE)]
            c = c_out
        mods.append(nn.Conv2d(c, 1, DISC_KERNEL, 1, 1))
        self.main = nn.Sequential(*mods)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, INIT_STD)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, INIT_STD)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


class VAEWithDiscriminator(nn.Module):
    """The VAE and its discriminator as one trained module (one optimizer, one checkpoint: ``vae.*``, ``disc.*``)."""

    def __init__(self, vae: AutoencoderKL, cfg: KLVAEConfig):
        super().__init__()
        self.vae = vae
        self.disc = PatchDiscriminator(cfg.in_channels, cfg.disc_channels, cfg.disc_layers)


def vae_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The VAE's own state dict out of a stage-1 checkpoint (a bare VAE's, or a ``VAEWithDiscriminator``'s)."""
    if not any(k.startswith("vae.") for k in state):
        return state
    return {k[len("vae."):]: v for k, v in state.items() if k.startswith("vae.")}


def disc_factor_at(step: int, cfg: KLVAEConfig) -> float:
    # LDM's adopt_weight: the GAN terms are off (0) before disc_start, disc_factor from it on
    return cfg.disc_factor if step >= cfg.disc_start else 0.0


def adaptive_weight(nll: torch.Tensor, g: torch.Tensor, last_layer: torch.Tensor, cfg: KLVAEConfig) -> torch.Tensor:
    # lambda = disc_weight * |grad nll| / (|grad G| + eps), clamped, no gradient through it [Taming eq. 5, LDM]
    grad_nll = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    grad_g = torch.autograd.grad(g, last_layer, retain_graph=True)[0]
    lam = grad_nll.norm() / (grad_g.norm() + cfg.adaptive_weight_eps)
    return lam.clamp(0.0, cfg.adaptive_weight_max).detach() * cfg.disc_weight


class LDMLoss:
    """``loss_fn(net, x, step)`` -> per-sample (B,) terms: recon, lpips, kl, g, d, d_weight, loss, bits_per_pixel.

    ``net`` is a ``VAEWithDiscriminator`` when the discriminator is on (``cfg.uses_discriminator``), else the bare
    VAE; ``lpips`` is a frozen ``ulbench.metrics.lpips.LPIPS`` (or None when perceptual_weight is 0)."""

    def __init__(self, cfg: KLVAEConfig, lpips: nn.Module | None):
        if cfg.perceptual_weight > 0 and lpips is None:
            raise ValueError("perceptual_weight > 0 needs an LPIPS network")
        self.cfg, self.lpips = cfg, lpips

    def __call__(self, net: nn.Module, x: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        vae, disc = (net.vae, net.disc) if cfg.uses_discriminator else (net, None)  # as vae_losses takes the net
        x = to_vae_range(x, cfg.input_range)
        posterior = vae.encode(x).latent_dist
        x_hat = vae.decode(posterior.sample()).sample  # (B, C, H, W), unclamped
        D = x[0].numel()  # C*H*W values per image
        recon = reconstruction_error(x, x_hat, cfg.recon_loss)  # (B,) per-value mean [LDM: L1]
        zero = x.new_zeros(len(x))
        lp = self.lpips(_rgb(from_vae_range(x, cfg.input_range)), _rgb(from_vae_range(x_hat, cfg.input_range))) \
            if cfg.perceptual_weight > 0 else zero  # (B,) LPIPS in [-1, 1]
        kl = posterior_kl(posterior)  # (B,) nats
        nll = D * (recon + cfg.perceptual_weight * lp)  # (B,) summed over the D values, as LDM sums
        g = d = lam = zero
        f = disc_factor_at(step, cfg)
        if disc is not None:  # run at every step, as LDM does: the cost per step does not jump at disc_start
            disc.requires_grad_(False)  # G moves the VAE only
            g = -disc(x_hat).flatten(1).mean(1)  # (B,)
            disc.requires_grad_(True)
            if f > 0:
                lam = adaptive_weight(nll.mean(), g.mean(), vae.decoder.conv_out.weight, cfg).expand(len(x))
            real, fake = disc(x.detach()).flatten(1), disc(x_hat.detach()).flatten(1)  # L_disc moves disc only
            d = f * 0.5 * (F.relu(1.0 - real).mean(1) + F.relu(1.0 + fake).mean(1))  # (B,) hinge
        loss = (nll + cfg.kl_weight * kl + lam * f * g) / D + d
        bits_per_pixel = kl.detach() / math.log(2) / (x.shape[-2] * x.shape[-1])  # protocols.md "Latent bitrate"
        return {"recon": recon, "lpips": lp.detach(), "kl": kl, "g": g.detach(), "d": d.detach(), "d_weight": lam,
                "loss": loss, "bits_per_pixel": bits_per_pixel}


def _rgb(x: torch.Tensor) -> torch.Tensor:
    """LPIPS takes RGB: one channel (grayscale) repeated."""
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
