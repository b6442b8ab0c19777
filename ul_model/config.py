"""Typed configuration and named presets (ul-method.md section 4). Every [choice] is a field with its default."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class EncoderConfig:
    # 2x2 patching, then a ResNet with one stage per entry of `channels`, downsampling 2x between stages [paper]
    patch: int = 2
    channels: tuple[int, ...] = (128, 256, 512, 512)
    blocks: tuple[int, ...] = (2, 2, 2, 3)
    latent_channels: int = 32
    # Video only (ULConfig.frames > 0): frames per temporal patch, and each downsampling's temporal stride [choice]
    time_patch: int = 1
    time_strides: tuple[int, ...] = ()  # one per stage after the first; () = all 1


@dataclass(frozen=True)
class TransformerConfig:
    width: int = 1024
    depth: int = 8
    heads: int = 16
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    attention: str = "full"  # [choice] video: "full" over all space-time tokens, "factorized" (space, time alternate)


@dataclass(frozen=True)
class DecoderConfig:
    # U-ViT (SiD2 family): 2x2 patching, conv stages, middle transformer at the latent's resolution [paper]
    patch: int = 2
    channels: tuple[int, ...] = (128, 256, 512)
    blocks_per_stage: int = 2  # [choice]
    middle: TransformerConfig = TransformerConfig(width=1024, depth=8, dropout=0.1)
    z_injection: str = "both"  # [choice] "tokens" (projected onto middle tokens), "input" (upsampled concat), "both"
    time_patch: int = 1  # video only, as EncoderConfig [choice]
    time_strides: tuple[int, ...] = ()  # one per conv stage; () = all 1


@dataclass(frozen=True)
class BaseModelConfig:
    # 2-stage ViT on the latent, patch size 1 [paper]: stage 1 at full token resolution, stage 2 at 2x2-merged tokens
    widths: tuple[int, int] = (512, 1024)
    depths: tuple[int, int] = (6, 16)
    heads: int = 16
    dropout: float = 0.1
    attention: str = "full"  # [choice] as TransformerConfig.attention


@dataclass(frozen=True)
class DiffusionConfig:
    lambda_z0: float = 5.0  # lambda_z(0): fixed encoder noise and the prior's/base model's maximum log-SNR [paper]
    prior_lambda_min: float = -10.0  # [choice]
    decoder_lambda_min: float = -15.0  # [choice]
    decoder_lambda_max: float = 15.0  # [choice]
    decoder_shift_ref: int = 64  # [choice] resolution shift 2 log(d_ref / d) for the pixel decoder (simple diffusion)
    decoder_interp_ref: int | None = None  # [choice] None: shifted schedule; an int: interpolated from this low-res ref
    base_lambda_min: float = -10.0  # [choice]
    c_lf: float = 1.5  # decoder loss factor [paper baseline]
    sigmoid_bias: float = 0.0  # b of sigmoid(b - lambda) [choice]
    base_sigmoid_bias: float = 0.0  # [choice]
    label_dropout: float = 0.1  # for classifier-free guidance [choice]
    stop_prior_grad: bool = False  # ablation A of the paper (gFID 7.80 vs 1.54): the prior's gradient stops at z


@dataclass(frozen=True)
class ULConfig:
    name: str
    resolution: int
    image_channels: int = 3
    num_classes: int = 1000
    encoder: EncoderConfig = EncoderConfig()
    prior: TransformerConfig = TransformerConfig(width=1024, depth=8)
    decoder: DecoderConfig = DecoderConfig()
    base: BaseModelConfig = BaseModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    frames: int = 0  # 0: images (C, R, R); T > 0: clips (C, T, R, R) (Kinetics-600: 16) [paper]
    context_frames: int = 0  # clips: frames given, the rest predicted (Kinetics-600 frame prediction: 5) [paper]

    @property
    def video(self) -> bool:
        return self.frames > 0

    @property
    def data_shape(self) -> tuple[int, ...]:
        r = self.resolution
        return (self.image_channels, self.frames, r, r) if self.video else (self.image_channels, r, r)

    @property
    def pixels(self) -> int:
        """Pixels per item (bits/pixel divides by them): R^2, or T R^2 for a clip."""
        return self.resolution**2 * max(self.frames, 1)

    @property
    def latent_resolution(self) -> int:
        return self.resolution // (self.encoder.patch * 2 ** (len(self.encoder.channels) - 1))

    @property
    def latent_frames(self) -> int:
        return self.frames // (self.encoder.time_patch * math.prod(self.encoder.time_strides))

    @property
    def latent_shape(self) -> tuple[int, ...]:
        r = self.latent_resolution
        if self.video:
            return (self.encoder.latent_channels, self.latent_frames, r, r)
        return (self.encoder.latent_channels, r, r)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, ULConfig] = {
    # CPU-sized: 32x32 images -> 4x8x8 latent; trains in minutes on 2 cores. [choice]
    "ul-tiny": ULConfig(
        name="ul-tiny", resolution=32, num_classes=10,
        encoder=EncoderConfig(channels=(32, 64), blocks=(1, 1), latent_channels=4),
        prior=TransformerConfig(width=64, depth=2, heads=4),
        decoder=DecoderConfig(channels=(64,), blocks_per_stage=2,
                              middle=TransformerConfig(width=128, depth=2, heads=4, dropout=0.0)),
        base=BaseModelConfig(widths=(64, 128), depths=(2, 2), heads=4, dropout=0.0),
        # c_lf 4 [choice]: at 32x32 and a few hundred CPU steps the paper's 1.5 collapses the latent (measured:
        # 0.012 bits/pixel, reconstructions no closer to their own image than to another); 4.0 keeps ~0.04 bits/pixel.
        diffusion=DiffusionConfig(decoder_shift_ref=32, c_lf=4.0),
    ),
    # The paper's ImageNet-512 shapes (section 4 table): 32x32x32 latent. [paper]
    "ul-small": ULConfig(name="ul-small", resolution=512),
    # Same autoencoder, larger base model. The paper does not print the medium widths: [choice] 1.5x width, 24 blocks.
    "ul-medium": ULConfig(name="ul-medium", resolution=512,
                          base=BaseModelConfig(widths=(768, 1536), depths=(6, 24), heads=16)),
    # Kinetics-600 frame prediction (section 4): 16x128x128 clips downsampled 4x8x8 to a 4x16x16 latent, 5 frames
    # given and 11 predicted [paper]. Widths as the image presets; where the paper is silent, [choice]: 8x spatial is
    # 2x2 patching + 2 stride-2 stages, 4x temporal is two time-stride-2 stages (encoder) / conv stages (decoder);
    # the decoder's conv stages [128, 256] at 2x2 patching see as many positions as the image decoder's at 512px.
    "video-ul-small": ULConfig(
        name="video-ul-small", resolution=128, num_classes=600, frames=16, context_frames=5,
        encoder=EncoderConfig(channels=(128, 256, 512), blocks=(2, 2, 3), time_strides=(2, 2)),
        decoder=DecoderConfig(channels=(128, 256), time_strides=(2, 2)),
    ),
    "video-ul-medium": ULConfig(
        name="video-ul-medium", resolution=128, num_classes=600, frames=16, context_frames=5,
        encoder=EncoderConfig(channels=(128, 256, 512), blocks=(2, 2, 3), time_strides=(2, 2)),
        decoder=DecoderConfig(channels=(128, 256), time_strides=(2, 2)),
        base=BaseModelConfig(widths=(768, 1536), depths=(6, 24), heads=16),
    ),
    # CPU-sized: 16x32x32 clips -> 8x4x8x8 latent (4x4x4 downsampling, the paper's 24x compression) [choice].
    "video-ul-tiny": ULConfig(
        name="video-ul-tiny", resolution=32, num_classes=10, frames=16, context_frames=5,
        encoder=EncoderConfig(channels=(32, 64), blocks=(1, 1), latent_channels=8, time_patch=2, time_strides=(2,)),
        prior=TransformerConfig(width=64, depth=2, heads=4),
        decoder=DecoderConfig(channels=(32,), blocks_per_stage=2, time_patch=2, time_strides=(2,),
                              middle=TransformerConfig(width=128, depth=2, heads=4, dropout=0.0)),
        base=BaseModelConfig(widths=(64, 128), depths=(2, 2), heads=4, dropout=0.0),
        diffusion=DiffusionConfig(decoder_shift_ref=32, c_lf=4.0),  # c_lf as ul-tiny (its note)
    ),
}


def get_preset(name: str, **overrides) -> ULConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset '{name}'; available: {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides) if overrides else PRESETS[name]
