"""EDM2 baseline (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", NVlabs/edm2):
the magnitude-preserving U-Net of config G on 64x64x4 SD-VAE latents, EDM preconditioning, log-normal noise levels,
learned per-noise-level uncertainty weighting, the EDM Heun sampler and power-function EMA.

Equation numbers refer to the EDM2 paper unless marked "EDM" (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models"). Written from the papers; facts (preset values, layer layout) checked against
NVlabs/edm2.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace

import torch
from torch import nn

from baselines.edm2_layers import Block, MPConv, MPFourier, mp_cat, mp_silu, mp_sum
from ul_model.sampling import SampleNoise

C_NOISE_SCALE = 0.25  # c_noise = ln(sigma) / 4, EDM Table 1


@dataclass(frozen=True)
class EDM2Config:
    name: str
    model_channels: int
    # data: SD-VAE ft-MSE latents of ImageNet-512 (f8), standardized to std sigma_data [paper]
    latent_resolution: int = 64
    latent_channels: int = 4
    label_dim: int = 1000  # 0: unconditional network (EDM2's guide networks)
    label_dropout: float = 0.0  # EDM2 trains without it; > 0 trains the unconditional branch that guidance uses
    # U-Net of config G (Fig. 21) [paper]
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    channel_mult_noise: int | None = None  # noise-embedding width = model_channels x this; None: channel_mult[0]
    channel_mult_emb: int | None = None  # embedding ("MLP") width = model_channels x this; None: max(channel_mult)
    num_blocks: int = 3
    attn_resolutions: tuple[int, ...] = (16, 8)
    channels_per_head: int = 64
    dropout: float = 0.0  # 0.1 from M up [paper]
    res_balance: float = 0.3  # t of mp_sum(main, residual)
    attn_balance: float = 0.3  # t of mp_sum(main, attention)
    label_balance: float = 0.5  # t of mp_sum(noise embedding, class embedding)
    concat_balance: float = 0.5  # t of mp_cat(main, skip)
    clip_act: float | None = 256.0
    logvar_channels: int = 128  # Fourier features of the uncertainty estimate u(sigma), eq. 21
    # EDM diffusion: preconditioning, training noise levels (ImageNet-512 values), sampler [paper]
    sigma_data: float = 0.5
    P_mean: float = -0.4
    P_std: float = 1.0
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    # optimization: Adam, inverse square-root decay after t_ref batches, linear warm-up [paper]
    ref_lr: float = 0.012
    ref_batches: float = 70_000
    rampup_Mimg: float = 10.0
    adam_betas: tuple[float, float] = (0.9, 0.99)
    batch_size: int = 2048
    train_Mimg: float = 2147.483648  # 2048 << 20 images
    # power-function EMA profiles tracked during training [paper]; the first is sampled from [choice: the tracked
    # profile nearest the published FID-optimal sigma_rel of every size, 0.085-0.135, as post-hoc EMA is not done]
    ema_stds: tuple[float, ...] = (0.100, 0.050)
    sample_steps: int = 32  # Heun steps, 63 network evaluations [paper]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.latent_resolution, self.latent_resolution)

    @property
    def block_channels(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    @property
    def noise_channels(self) -> int:
        mult = self.channel_mult_noise if self.channel_mult_noise is not None else self.channel_mult[0]
        return self.model_channels * mult

    @property
    def emb_channels(self) -> int:
        mult = self.channel_mult_emb if self.channel_mult_emb is not None else max(self.channel_mult)
        return self.model_channels * mult

    def to_dict(self) -> dict:
        return asdict(self)


def _img512(name: str, channels: int, lr: float, dropout: float, train_Mimg: float) -> EDM2Config:
    return EDM2Config(name=name, model_channels=channels, ref_lr=lr, dropout=dropout, train_Mimg=train_Mimg)


# train_edm2.py presets edm2-img512-*: channels, alpha_ref, dropout, duration (2^20 images) [paper]
EDM2_PRESETS: dict[str, EDM2Config] = {
    "edm2-xs": _img512("edm2-xs", 128, 0.0120, 0.0, 2048 * 2**20 / 1e6),
    "edm2-s": _img512("edm2-s", 192, 0.0100, 0.0, 2048 * 2**20 / 1e6),
    "edm2-m": _img512("edm2-m", 256, 0.0090, 0.1, 2048 * 2**20 / 1e6),
    "edm2-l": _img512("edm2-l", 320, 0.0080, 0.1, 1792 * 2**20 / 1e6),
    "edm2-xl": _img512("edm2-xl", 384, 0.0070, 0.1, 1280 * 2**20 / 1e6),
    "edm2-xxl": _img512("edm2-xxl", 448, 0.0065, 0.1, 896 * 2**20 / 1e6),
    # CPU-sized [choice]: 4x8x8 latents, 10 classes; 200 steps (the tested run) take ~25 s on 2 busy cores. Label
    # dropout so the same-network guidance of generate() has a trained unconditional branch; no warm-up or decay.
    "edm2-tiny": EDM2Config(
        name="edm2-tiny", model_channels=32, latent_resolution=8, label_dim=10, label_dropout=0.1,
        channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), channels_per_head=32, logvar_channels=32,
        ref_lr=0.01, ref_batches=0, rampup_Mimg=0, batch_size=32, train_Mimg=0.0064, ema_stds=(0.10,)),
}


def get_preset(name: str, **overrides) -> EDM2Config:
    if name not in EDM2_PRESETS:
        raise KeyError(f"unknown preset '{name}'; available: {', '.join(EDM2_PRESETS)}")
    return replace(EDM2_PRESETS[name], **overrides) if overrides else EDM2_PRESETS[name]


class EDM2UNet(nn.Module):
    """F(x, c_noise, labels) of config G (Fig. 21). Encoder: 3x3 conv on [x, 1], then per level (a downsampling
    block and) ``num_blocks`` blocks; decoder: per level (two middle blocks or an upsampling block and)
    ``num_blocks + 1`` blocks, each fed mp_cat(main, skip). The output conv's gain is learned from 0."""

    def __init__(self, cfg: EDM2Config):
        super().__init__()
        self.label_dim, self.label_balance, self.concat_balance = cfg.label_dim, cfg.label_balance, cfg.concat_balance
        C_emb = cfg.emb_channels
        block = {"emb_channels": C_emb, "channels_per_head": cfg.channels_per_head, "dropout": cfg.dropout,
                 "res_balance": cfg.res_balance, "attn_balance": cfg.attn_balance, "clip_act": cfg.clip_act}
        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(cfg.noise_channels)
        self.emb_noise = MPConv(cfg.noise_channels, C_emb)
        self.emb_label = MPConv(cfg.label_dim, C_emb) if cfg.label_dim else None

        self.enc = nn.ModuleDict()
        c = cfg.latent_channels + 1  # + constant channel
        for level, channels in enumerate(cfg.block_channels):
            r = cfg.latent_resolution >> level
            if level == 0:
                self.enc[f"{r}x{r}_conv"] = MPConv(c, channels, (3, 3))
                c = channels
            else:
                self.enc[f"{r}x{r}_down"] = Block(c, c, flavor="enc", resample_mode="down", **block)
            for i in range(cfg.num_blocks):
                self.enc[f"{r}x{r}_block{i}"] = Block(c, channels, flavor="enc", attention=r in cfg.attn_resolutions,
                                                      **block)
                c = channels

        self.dec = nn.ModuleDict()
        skips = [m.out_channels for m in self.enc.values()]
        for level, channels in reversed(list(enumerate(cfg.block_channels))):
            r = cfg.latent_resolution >> level
            if level == len(cfg.block_channels) - 1:
                self.dec[f"{r}x{r}_in0"] = Block(c, c, flavor="dec", attention=True, **block)
                self.dec[f"{r}x{r}_in1"] = Block(c, c, flavor="dec", **block)
            else:
                self.dec[f"{r}x{r}_up"] = Block(c, c, flavor="dec", resample_mode="up", **block)
            for i in range(cfg.num_blocks + 1):
                self.dec[f"{r}x{r}_block{i}"] = Block(c + skips.pop(), channels, flavor="dec",
                                                      attention=r in cfg.attn_resolutions, **block)
                c = channels
        self.out_conv = MPConv(c, cfg.latent_channels, (3, 3))

    # Fig. 21: emb = mp_silu(mp_sum(W_noise fourier(c_noise), W_label onehot * sqrt(label_dim))).
    def embedding(self, c_noise: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        emb = self.emb_noise(self.emb_fourier(c_noise))  # (B, C_emb)
        if self.emb_label is not None:
            if labels is None:
                labels = torch.full_like(c_noise, self.label_dim, dtype=torch.long)
            # index == label_dim is the null class: an all-zero one-hot, hence a zero class embedding
            onehot = nn.functional.one_hot(labels.long(), self.label_dim + 1)[:, :-1].to(emb.dtype)  # (B, classes)
            emb = mp_sum(emb, self.emb_label(onehot * math.sqrt(self.label_dim)), t=self.label_balance)
        return mp_silu(emb)

    # F_theta(x, c_noise, labels), Fig. 21.
    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        emb = self.embedding(c_noise, labels)  # (B, C_emb)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)  # (B, C + 1, H, W)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if name.endswith("_conv") else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "_block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)  # (B, C + C_skip, H', W')
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)  # (B, C, H, W)


class Precond(nn.Module):
    """D(x, sigma, labels) = c_skip x + c_out F(c_in x, c_noise, labels) (EDM Table 1), plus the learned
    uncertainty u(sigma) = linear(MP-Fourier(c_noise)) of eq. 21, returned as ``logvar`` when asked.

    ``labels``: (B,) class indices; None, or an index equal to ``label_dim``, is unconditional.
    """

    def __init__(self, cfg: EDM2Config):
        super().__init__()
        self.cfg = cfg
        self.sigma_data = cfg.sigma_data
        self.unet = EDM2UNet(cfg)
        self.logvar_fourier = MPFourier(cfg.logvar_channels)
        self.logvar_linear = MPConv(cfg.logvar_channels, 1)

    # EDM Table 1 preconditioning.
    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sigma_data = self.sigma_data
        c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
        c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
        c_in = 1 / (sigma_data**2 + sigma**2).sqrt()
        c_noise = sigma.log() * C_NOISE_SCALE
        return c_skip, c_out, c_in, c_noise

    # D(x, sigma) = c_skip x + c_out F(c_in x, c_noise), EDM eq. 7; logvar = u(sigma), eq. 21.
    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, labels: torch.Tensor | None = None,
                return_logvar: bool = False):
        x = x.float()  # (B, C, H, W)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])  # (B,)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)  # (B,) each
        F_x = self.unet(c_in[:, None, None, None] * x, c_noise, labels)  # (B, C, H, W)
        D_x = c_skip[:, None, None, None] * x + c_out[:, None, None, None] * F_x.float()
        if not return_logvar:
            return D_x
        logvar = self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1)  # (B,)
        return D_x, logvar


def build(cfg: EDM2Config) -> Precond:
    return Precond(cfg)


@dataclass
class EDM2Terms:
    loss: torch.Tensor  # (B,) sum over elements of weight / exp(u) (D - y)^2 + u, eq. 21
    denoise_mse: torch.Tensor  # (B,) unweighted mean((D - y)^2)
    logvar: torch.Tensor  # (B,) u(sigma)

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class EDM2Loss:
    """Uncertainty-weighted EDM loss (eqs. 14-16, 21), per sample, reduced as EDM2 reduces it: the per-element loss
    lambda / exp(u) (D - y)^2 + u summed over a sample's elements (training_loop.py sums, then divides by the
    batch)."""

    def __init__(self, P_mean: float = -0.4, P_std: float = 1.0, sigma_data: float = 0.5):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data

    # ln sigma ~ N(P_mean, P_std^2), EDM Table 1.
    def sample_sigma(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        return (torch.randn(n, device=device, generator=generator) * self.P_std + self.P_mean).exp()

    # L = lambda(sigma) / exp(u(sigma)) ||D(y + n, sigma) - y||^2 + u(sigma), eq. 21.
    def __call__(self, net: Precond, y: torch.Tensor, labels: torch.Tensor | None = None,
                 sigma: torch.Tensor | None = None, generator: torch.Generator | None = None) -> EDM2Terms:
        sigma = self.sample_sigma(y.shape[0], y.device, generator) if sigma is None else sigma  # (B,)
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2  # lambda(sigma), EDM Table 1
        n = torch.randn(y.shape, device=y.device, generator=generator) * sigma[:, None, None, None]
        D_yn, logvar = net(y + n, sigma, labels, return_logvar=True)
        denoise_mse = (D_yn - y).square().flatten(1).mean(1)  # (B,)
        loss = (weight / logvar.exp() * denoise_mse + logvar) * y[0].numel()  # = the sum over the D elements
        return EDM2Terms(loss=loss, denoise_mse=denoise_mse, logvar=logvar)


def drop_labels(labels: torch.Tensor | None, label_dim: int, p: float,
                generator: torch.Generator | None = None) -> torch.Tensor | None:
    """Replace each label by the null class (index ``label_dim``) with probability ``p``."""
    if labels is None or p <= 0:
        return labels
    drop = torch.rand(labels.shape, device=labels.device, generator=generator) < p
    return torch.where(drop, torch.full_like(labels, label_dim), labels)


def training_losses(model: Precond, cfg: EDM2Config, x0: torch.Tensor, labels: torch.Tensor | None,
                    sigma: torch.Tensor | None = None, generator: torch.Generator | None = None
                    ) -> dict[str, torch.Tensor]:
    """Per-sample (B,) terms "loss", "denoise_mse", "logvar" on standardized latents ``x0``; reduce outside.
    ``sigma`` fixes the noise levels (evaluation) instead of drawing them from the log-normal. Labels are dropped
    (``cfg.label_dropout``) only while ``model.training``."""
    if model.training:
        labels = drop_labels(labels, cfg.label_dim, cfg.label_dropout, generator)
    return EDM2Loss(cfg.P_mean, cfg.P_std, cfg.sigma_data)(model, x0, labels, sigma, generator).as_dict()


def train_recipe(cfg: EDM2Config) -> dict:
    """EDM2's published optimization as ul_model.train.TrainConfig fields (training_loop.py, train_edm2.py): Adam
    (0.9, 0.99) without weight decay, alpha_ref / sqrt(max(t / t_ref, 1)) with a linear ramp-up in images, no
    gradient clipping, power-function EMA profiles (the first is sampled from; post-hoc reconstruction is not done
    here), the preset's batch."""
    return {"batch_size": cfg.batch_size, "lr": cfg.ref_lr, "betas": cfg.adam_betas, "weight_decay": 0.0,
            "warmup_steps": 0, "lr_rampup_images": cfg.rampup_Mimg * 1e6, "lr_decay_batches": cfg.ref_batches,
            "grad_clip": 0.0, "ema_stds": cfg.ema_stds}


# ---- sampling -----------------------------------------------------------------------------------------------------

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # D(x (B, ...), sigma (B,)) -> (B, ...)


# sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, sigma_N = 0, EDM Table 1.
def edm_sigma_steps(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    i = torch.arange(steps, dtype=torch.float64)
    ramp = i / max(steps - 1, 1)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])  # (steps + 1,)


# EDM Algorithm 1 (deterministic Heun, no churn): 2 evaluations per step, 1 on the last (to sigma = 0).
@torch.no_grad()
def heun_sample(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Integrate dx/dsigma = (x - D(x, sigma)) / sigma from ``sigmas[0]`` (``x`` already scaled) to ``sigmas[-1]``."""
    n = x.shape[0]
    for sigma_cur, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        d_cur = (x - denoise(x, x.new_full((n,), sigma_cur))) / sigma_cur
        x_next = x + (sigma_next - sigma_cur) * d_cur  # Euler step
        if sigma_next > 0:
            d_next = (x_next - denoise(x_next, x.new_full((n,), sigma_next))) / sigma_next
            x_next = x + (sigma_next - sigma_cur) * (0.5 * d_cur + 0.5 * d_next)  # 2nd-order correction
        x = x_next
    return x


# D_w = D_u + w (D_c - D_u) (classifier-free form of EDM2's guidance; w = 1 is one conditional pass).
def guided_denoiser(model: Precond, labels: torch.Tensor | None, guidance: float) -> Denoiser:
    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        D_c = model(x, sigma, labels)
        if guidance == 1.0 or labels is None:
            return D_c
        D_u = model(x, sigma, None)
        return D_u.lerp(D_c, guidance)

    return denoise


@torch.no_grad()
def generate(model: Precond, cfg: EDM2Config, seeds: Sequence[int], labels: torch.Tensor | None,
             guidance: float = 1.0, steps: int = 32) -> torch.Tensor:
    """Latents (N, C, H, W) from the EDM Heun sampler (``steps`` steps, 2 steps - 1 evaluations per pass), starting
    from sigma_max x ``SampleNoise(seeds)``, so sample i depends only on seed i (not on its batch mates).

    Guidance here is classifier-free style with the same network's unconditional branch (needs label_dropout > 0 in
    training). EDM2's published guided FIDs instead use a separately trained unconditional XS network as the guide
    (D = D_guide + w (D_main - D_guide), autoguidance-style), so guided numbers from this function are not those.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        sigmas = edm_sigma_steps(steps, cfg.sigma_min, cfg.sigma_max, cfg.rho)
        x = SampleNoise(seeds, cfg.latent_shape, device=device).draw() * sigmas[0].item()  # (N, C, H, W)
        labels = labels.to(device) if labels is not None else None
        return heun_sample(guided_denoiser(model, labels, guidance), x, sigmas)
    finally:
        model.train(was_training)
