"""DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers") and its diffusion recipe (ADM / iDDPM).

The network: patchify (conv k=p, s=p) + fixed 2-D sin-cos positions, timestep and class embeddings summed into one
condition c, adaLN-Zero transformer blocks, an adaLN final layer, unpatchify; 2C output channels (eps, v) when the
variance is learned. The recipe: 1000-step linear betas, eps-prediction MSE plus the VLB term with the mean's
gradient stopped (improved DDPM's "hybrid" loss, as DiT trains), ancestral sampling respaced to 250 steps with the
learned variance, classifier-free guidance on the eps channels. Parameter names follow facebookresearch/DiT, so its
released checkpoints load with ``load_state_dict``.

Equation numbers: [DDPM] Ho et al. 2020, [iDDPM] Nichol & Dhariwal 2021, [ADM] Dhariwal & Nichol 2021.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ul_model.sampling import SampleNoise


@dataclass(frozen=True)
class DiTConfig:
    name: str
    latent_resolution: int  # DiT's input_size: 32 for 256^2 images through the f8 SD-VAE
    latent_channels: int = 4
    patch: int = 2
    hidden: int = 1152
    depth: int = 28
    heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    label_dropout: float = 0.1  # for classifier-free guidance; > 0 adds the null class (index num_classes)
    learn_sigma: bool = True  # output (eps, v): v interpolates log beta_t and log beta~_t [iDDPM eq. 15]
    diffusion_steps: int = 1000
    beta_start: float = 1e-4  # linear schedule [DDPM], scaled by 1000 / diffusion_steps as ADM does
    beta_end: float = 0.02
    frequency_embedding_size: int = 256  # sinusoidal timestep features fed to the timestep MLP
    max_period: float = 10000.0  # of the timestep and positional sinusoids
    norm_eps: float = 1e-6  # LayerNorm (no affine) before each adaLN modulation
    embed_init_std: float = 0.02  # label table and timestep MLP weights
    decoder_bin_halfwidth: float = 1 / 255  # decoder NLL bins at t = 0: data in [-1, 1] on 256 levels [DDPM 3.3]
    decoder_edge: float = 0.999  # beyond +-edge the outermost bin extends to +-infinity [DDPM 3.3]
    guidance_channels: int | None = 3  # DiT's sample.py guides eps[:, :3] only; None guides all C eps channels
    # Training and sampling recipe (DiT section 4), for the harness; the model code does not read them.
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 256
    ema_decay: float = 0.9999
    vae_scale: float = 0.18215  # SD-VAE latents are multiplied by this before diffusion
    sample_steps: int = 250
    guidance: float = 1.5

    @property
    def out_channels(self) -> int:
        return 2 * self.latent_channels if self.learn_sigma else self.latent_channels

    @property
    def num_patches(self) -> int:
        return (self.latent_resolution // self.patch) ** 2

    @property
    def null_class(self) -> int:
        return self.num_classes


_SIZES = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16), "xl": (1152, 28, 16)}  # hidden, depth, heads
DIT_PRESETS: dict[str, DiTConfig] = {
    f"dit-{size}-{p}": DiTConfig(name=f"dit-{size}-{p}", latent_resolution=32, patch=p, hidden=h, depth=d, heads=n)
    for size, (h, d, n) in _SIZES.items() for p in (2, 4, 8)
}
# CPU-sized [choice]: 4x8x8 latents, 16 tokens of width 128; trains in well under a minute on 2 cores.
DIT_PRESETS["dit-tiny"] = DiTConfig(name="dit-tiny", latent_resolution=8, hidden=128, depth=4, heads=4,
                                    num_classes=10)


def build(cfg: DiTConfig) -> DiT:
    return DiT(cfg)


def train_recipe(cfg: DiTConfig) -> dict:
    """DiT's published optimization (section 4, train.py) as ul_model.train.TrainConfig fields: AdamW at a
    constant lr (no warm-up), torch's default betas (0.9, 0.999), no weight decay, no gradient clipping, EMA."""
    return {"batch_size": cfg.batch_size, "lr": cfg.learning_rate, "betas": (0.9, 0.999),
            "weight_decay": cfg.weight_decay, "warmup_steps": 0, "grad_clip": 0.0, "ema_decay": cfg.ema_decay,
            "ema_stds": ()}


# ---------------------------------------------------------------------------------------------------- network


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # adaLN: x * (1 + scale) + shift, one (shift, scale) per sample broadcast over tokens [DiT 3.2]
    return x * (1 + scale[:, None]) + shift[:, None]


def timestep_features(t: torch.Tensor, dim: int, max_period: float) -> torch.Tensor:
    # [cos(t w_i), sin(t w_i)], w_i = max_period^(-i / (dim/2)) (GLIDE/ADM timestep embedding; cos half first)
    half = dim // 2
    w = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)  # (dim/2,)
    angle = t.float()[:, None] * w[None]  # (B, dim/2)
    return torch.cat([torch.cos(angle), torch.sin(angle)], dim=-1)  # (B, dim)


def sincos_2d(dim: int, grid: int, max_period: float) -> torch.Tensor:
    # Fixed 2-D positions (MAE): first half of the channels encode the column, second half the row; each half is
    # [sin(pos w_i), cos(pos w_i)] with w_i = max_period^(-i / (dim/4)). Tokens are in row-major order.
    quarter = dim // 4
    w = 1.0 / max_period ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)
    pos = torch.arange(grid, dtype=torch.float64)  # (G,)
    row, col = torch.meshgrid(pos, pos, indexing="ij")  # (G, G) each

    def embed(p: torch.Tensor) -> torch.Tensor:
        angle = p.reshape(-1, 1) * w[None]  # (G*G, dim/4)
        return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)  # (G*G, dim/2)

    return torch.cat([embed(col), embed(row)], dim=1).float()  # (G*G, dim)


class TimestepEmbedder(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.dim, self.max_period = cfg.frequency_embedding_size, cfg.max_period
        self.mlp = nn.Sequential(nn.Linear(self.dim, cfg.hidden), nn.SiLU(), nn.Linear(cfg.hidden, cfg.hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t, self.dim, self.max_period))  # (B,) -> (B, D)


class LabelEmbedder(nn.Module):
    """Class embedding; with label dropout p > 0 the table has a null class (index num_classes) that training swaps
    in with probability p (global RNG), for classifier-free guidance."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.null_class, self.dropout = cfg.null_class, cfg.label_dropout
        self.embedding_table = nn.Embedding(cfg.num_classes + int(cfg.label_dropout > 0), cfg.hidden)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout  # (B,)
            y = torch.where(drop, torch.full_like(y, self.null_class), y)  # (B,)
        return self.embedding_table(y)  # (B, D)


class Attention(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape  # (B, T, D)
        qkv = self.qkv(x).reshape(B, T, 3, self.heads, D // self.heads)  # (B, T, 3, H, D/H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, H, T, D/H) each
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, D/H)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class Mlp(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden, int(cfg.hidden * cfg.mlp_ratio))
        self.fc2 = nn.Linear(int(cfg.hidden * cfg.mlp_ratio), cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # (B, T, D) -> (B, T, 4D) -> (B, T, D)


class DiTBlock(nn.Module):
    """adaLN-Zero block [DiT 3.2]: c regresses shift, scale and a residual gate for attention and for the MLP."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden, elementwise_affine=False, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden, elementwise_affine=False, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden, 6 * cfg.hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        mod = self.adaLN_modulation(c).chunk(6, dim=1)  # 6 x (B, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod  # (B, D) each
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (B, T, D)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (B, T, D)


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm_final = nn.LayerNorm(cfg.hidden, elementwise_affine=False, eps=cfg.norm_eps)
        self.linear = nn.Linear(cfg.hidden, cfg.patch ** 2 * cfg.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden, 2 * cfg.hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # (B, D) each
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, T, p*p*C_out)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.latent_channels, cfg.hidden, kernel_size=cfg.patch, stride=cfg.patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, D, H/p, W/p) -> (B, T, D)


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        if cfg.latent_resolution % cfg.patch or cfg.hidden % cfg.heads or cfg.hidden % 4:
            raise ValueError(f"{cfg.name}: latent_resolution % patch, hidden % heads and hidden % 4 must be 0")
        self.cfg = cfg
        self.x_embedder = PatchEmbed(cfg)
        self.t_embedder = TimestepEmbedder(cfg)
        self.y_embedder = LabelEmbedder(cfg)
        grid = cfg.latent_resolution // cfg.patch
        self.register_buffer("pos_embed", sincos_2d(cfg.hidden, grid, cfg.max_period)[None])  # (1, T, D), fixed
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(cfg)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # DiT's init: xavier-uniform linears (and the patch conv seen as a linear), zero biases, N(0, 0.02) label
        # table and timestep MLP; adaLN-Zero: every modulation and the output linear start at zero [DiT 3.2].
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=self.cfg.embed_init_std)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=self.cfg.embed_init_std)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=self.cfg.embed_init_std)
        zero = [b.adaLN_modulation[-1] for b in self.blocks]
        zero += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p, c, g = self.cfg.patch, self.cfg.out_channels, self.cfg.latent_resolution // self.cfg.patch
        x = x.reshape(x.shape[0], g, g, p, p, c)  # (B, H/p, W/p, p, p, C_out)
        x = torch.einsum("nhwpqc->nchpwq", x)  # (B, C_out, H/p, p, W/p, p)
        return x.reshape(x.shape[0], c, g * p, g * p)  # (B, C_out, H, W)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.x_embedder(x) + self.pos_embed  # (B, C, H, W) -> (B, T, D), T = HW / p^2
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, D): timestep + class (null class = unconditional)
        for block in self.blocks:
            x = block(x, c)  # (B, T, D)
        x = self.final_layer(x, c)  # (B, T, p*p*C_out)
        return self.unpatchify(x)  # (B, C_out, H, W), C_out = 2C (eps, v) when learn_sigma else C


# -------------------------------------------------------------------------------------------------- diffusion


def linear_betas(cfg: DiTConfig) -> torch.Tensor:
    # beta_t linear in t [DDPM 4]; ADM scales the endpoints by 1000 / T so that other T keep the same total noise
    scale = 1000 / cfg.diffusion_steps
    return torch.linspace(scale * cfg.beta_start, scale * cfg.beta_end, cfg.diffusion_steps, dtype=torch.float64)


def spaced_timesteps(num_timesteps: int, steps: int) -> list[int]:
    # ADM's space_timesteps for one section: `steps` indices evenly strided over [0, T - 1], both ends included
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    stride = (num_timesteps - 1) / (steps - 1) if steps > 1 else 1
    taken, idx = [], 0.0
    for _ in range(steps):
        taken.append(round(idx))
        idx += stride
    return taken


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))  # (B, ...) -> (B,)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    # KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale, halfwidth: float, edge: float) -> torch.Tensor:
    # log P(bin of x) under N(mean, scale^2), bins x +- halfwidth, outermost bins open-ended [DDPM eq. 13]. Exact
    # normal CDF (ADM uses a tanh approximation of it): log_ndtr keeps the tails finite.
    inv_scale = torch.exp(-log_scale)
    upper = inv_scale * (x - mean + halfwidth)
    lower = inv_scale * (x - mean - halfwidth)
    log_cdf_upper = torch.special.log_ndtr(upper)  # log P(X < upper), used for the lowest bin
    log_sf_lower = torch.special.log_ndtr(-lower)  # log P(X > lower), used for the highest bin
    log_delta = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    return torch.where(x < -edge, log_cdf_upper, torch.where(x > edge, log_sf_lower, log_delta))


class GaussianDiffusion:
    """The discrete-time process on ``timesteps`` (all T, or a respaced subset: ADM's SpacedDiffusion).

    Arrays are float64 on the CPU; ``_at`` gathers them per sample and casts to the input's dtype and device.
    Index i runs over the kept timesteps; the model is called with the original timestep ``timestep_map[i]``.
    """

    def __init__(self, cfg: DiTConfig, timesteps: Sequence[int] | None = None):
        self.cfg = cfg
        alphas_cumprod = torch.cumprod(1 - linear_betas(cfg), dim=0)  # alpha-bar_t [DDPM eq. 4]
        timesteps = list(range(cfg.diffusion_steps)) if timesteps is None else list(timesteps)
        self.timestep_map = torch.tensor(timesteps, dtype=torch.long)
        self.alphas_cumprod = alphas_cumprod[self.timestep_map]  # (S,)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.betas = 1 - self.alphas_cumprod / self.alphas_cumprod_prev  # respaced beta_i (= beta_t unspaced)
        self.num_timesteps = len(timesteps)
        # q(x_{t-1} | x_t, x_0) = N(coef_x0 x_0 + coef_xt x_t, beta~_t) [DDPM eq. 6-7]
        self.posterior_variance = self.betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        # beta~_0 = 0: its log takes beta~_1 instead (ADM)
        clipped = torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        self.posterior_log_variance_clipped = torch.log(clipped)
        self.posterior_coef_x0 = self.betas * self.alphas_cumprod_prev.sqrt() / (1 - self.alphas_cumprod)
        self.posterior_coef_xt = (1 - self.alphas_cumprod_prev) * (1 - self.betas).sqrt() / (1 - self.alphas_cumprod)

    @staticmethod
    def _at(arr: torch.Tensor, i: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return arr.to(like.device, like.dtype)[i.to(like.device)].reshape(-1, *([1] * (like.ndim - 1)))  # (B,1,1,1)

    def q_sample(self, x0: torch.Tensor, i: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        # x_t = sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps [DDPM eq. 4]
        a = self._at(self.alphas_cumprod, i, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # mean and clipped log variance of q(x_{t-1} | x_t, x_0) [DDPM eq. 7]
        mean = self._at(self.posterior_coef_x0, i, x_t) * x0 + self._at(self.posterior_coef_xt, i, x_t) * x_t
        return mean, self._at(self.posterior_log_variance_clipped, i, x_t).expand_as(x_t)

    def p_mean_variance(self, out: torch.Tensor, x_t: torch.Tensor, i: torch.Tensor):
        """Mean and log variance of p(x_{t-1} | x_t) from the network output (eps, v), and the predicted x_0."""
        C = x_t.shape[1]
        eps = out[:, :C]  # (B, C, H, W)
        a = self._at(self.alphas_cumprod, i, x_t)
        x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()  # x_0 from eps [DDPM eq. 15]
        if self.cfg.learn_sigma:
            # log Sigma = frac log beta_t + (1 - frac) log beta~_t, frac = (v + 1) / 2 [iDDPM eq. 15]
            frac = (out[:, C:] + 1) / 2
            max_log = self._at(torch.log(self.betas), i, x_t)
            min_log = self._at(self.posterior_log_variance_clipped, i, x_t)
            log_var = frac * max_log + (1 - frac) * min_log
        else:  # ADM's "fixed large" variance, as DiT uses without learned sigma
            large = torch.cat([self.posterior_variance[1:2], self.betas[1:]])
            log_var = self._at(torch.log(large), i, x_t).expand_as(x_t)
        mean, _ = self.q_posterior(x0, x_t, i)
        return mean, log_var, x0

    def vb_terms_bits(self, out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        # L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, L_0 = -log p(x_0|x_1) [DDPM eq. 5], in bits
        true_mean, true_log_var = self.q_posterior(x0, x_t, i)
        mean, log_var, _ = self.p_mean_variance(out, x_t, i)
        kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)  # (B,)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var, self.cfg.decoder_bin_halfwidth,
                                                   self.cfg.decoder_edge)
        return torch.where(i.to(x0.device) == 0, mean_flat(nll) / math.log(2.0), kl)  # (B,)

    def losses(self, out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, i: torch.Tensor,
               eps: torch.Tensor) -> dict[str, torch.Tensor]:
        # L_hybrid = L_simple + L_vlb with the VLB's mean gradient stopped [iDDPM 3.1]; DiT weights L_vlb by 1
        C = x0.shape[1]
        mse = mean_flat((eps - out[:, :C]) ** 2)  # (B,)
        if not self.cfg.learn_sigma:
            return {"loss": mse, "mse": mse, "vb": torch.zeros_like(mse)}
        frozen = torch.cat([out[:, :C].detach(), out[:, C:]], dim=1)  # only v receives the VLB's gradient
        vb = self.vb_terms_bits(frozen, x0, x_t, i)  # (B,)
        return {"loss": mse + vb, "mse": mse, "vb": vb}


@functools.lru_cache(maxsize=8)
def diffusion_for(cfg: DiTConfig, steps: int | None = None) -> GaussianDiffusion:
    """The training process (steps None) or the process respaced to ``steps`` for sampling."""
    return GaussianDiffusion(cfg, None if steps is None else spaced_timesteps(cfg.diffusion_steps, steps))


def training_losses(model: nn.Module, cfg: DiTConfig, x0: torch.Tensor,
                    labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample (B,) "loss" = "mse" + "vb" at t ~ U{0..T-1}, eps ~ N(0, I), both from the global RNG."""
    diffusion = diffusion_for(cfg)
    t = torch.randint(0, diffusion.num_timesteps, (x0.shape[0],), device=x0.device)  # (B,)
    eps = torch.randn_like(x0)  # (B, C, H, W)
    x_t = diffusion.q_sample(x0, t, eps)  # (B, C, H, W)
    out = model(x_t, t, labels)  # (B, 2C, H, W)
    return diffusion.losses(out, x0, x_t, t, eps)


def guided_output(model: nn.Module, cfg: DiTConfig, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                  guidance: float) -> torch.Tensor:
    # eps = eps_u + w (eps_c - eps_u) on the first guidance_channels eps channels (DiT's forward_with_cfg); the
    # remaining channels (and v) are the conditional pass's. One batched pass of [cond; uncond]; w = 1: cond only.
    if guidance == 1.0 or bool((y == cfg.null_class).all()):
        return model(x, t, y)  # (B, 2C, H, W)
    y_both = torch.cat([y, torch.full_like(y, cfg.null_class)])  # (2B,): conditional, then null class
    out_c, out_u = model(torch.cat([x, x]), torch.cat([t, t]), y_both).chunk(2)  # (B, 2C, H, W) each
    k = cfg.latent_channels if cfg.guidance_channels is None else cfg.guidance_channels
    guided = out_u[:, :k] + guidance * (out_c[:, :k] - out_u[:, :k])  # (B, k, H, W)
    return torch.cat([guided, out_c[:, k:]], dim=1)  # (B, 2C, H, W)


@torch.no_grad()
def generate(model: nn.Module, cfg: DiTConfig, seeds: list[int], labels: torch.Tensor | None, guidance: float,
             steps: int) -> torch.Tensor:
    """Ancestral sampling of p(x_{t-1}|x_t) [DDPM Alg. 2] over ``steps`` respaced steps, learned variance, no clipping.

    Sample k's initial and per-step noise come from its own generator seeded by ``seeds[k]`` (SampleNoise), so it
    does not depend on the batch it is in. ``labels`` None samples the null class (unconditional).
    """
    device = next(model.parameters()).device
    if labels is None and cfg.label_dropout <= 0:
        raise ValueError(f"{cfg.name}: unconditional sampling needs the null class (label_dropout > 0)")
    diffusion = diffusion_for(cfg, steps)
    n, r = len(seeds), cfg.latent_resolution
    noise = SampleNoise(seeds, (cfg.latent_channels, r, r), device=device)
    y = torch.full((n,), cfg.null_class, dtype=torch.long, device=device) if labels is None else labels.to(device)
    was_training = model.training
    model.eval()
    x = noise.draw()  # (B, C, H, W): x_T ~ N(0, I)
    for i in reversed(range(steps)):
        idx = torch.full((n,), i, dtype=torch.long)  # (B,) respaced index
        t = diffusion.timestep_map[idx].to(device)  # (B,) original timestep the network was trained on
        out = guided_output(model, cfg, x, t, y, guidance)  # (B, 2C, H, W)
        mean, log_var, _ = diffusion.p_mean_variance(out, x, idx)  # (B, C, H, W) each
        x = mean if i == 0 else mean + torch.exp(0.5 * log_var) * noise.draw()  # (B, C, H, W)
    model.train(was_training)
    return x
