"""LODA's settings (the catalog's ``generate.loda``); defaults read in the reference
``KU-VGI/ConceptSplit/pipeline_sd2_1_loda.py`` (``__call__`` and ``_compute_harmonic_mean_kl_raw``)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator

from conceptflow.schema import StrictModel

# The reference smooths with Attend-and-Excite's GaussianSmoothing(kernel 7, sigma 1), whose kernel
# is exp(-((x - mu) / (2 sigma))^2): a Gaussian of standard deviation sqrt(2) * sigma. torchvision's
# gaussian_blur takes the standard deviation itself, so sqrt(2) gives the reference's kernel.
REFERENCE_SIGMA = math.sqrt(2.0)


class LodaConfig(StrictModel):
    """LODA sampling (ConceptSplit Algorithm 1). With ``enabled`` off or ``steps`` 0 it is plain
    fused sampling (the same images as the fused sampler, bit for bit, when no maps are recorded)."""

    enabled: bool = Field(True, description="latent optimisation for disentangled attention on the first `steps` steps")
    steps: int = Field(10, ge=0, description="N of Algorithm 1: LODA acts before the UNet call of steps 0..N-1 "
                       "(reference LODA_steps 10)")
    inner_steps: int = Field(10, ge=1, description="gradient steps on the latent per LODA step, each with its own "
                             "UNet pass (reference pipeline default 10; its inference script passes 1); stops early "
                             "once every image's loss is 0, which leaves the latent exactly as more steps would")
    threshold: float = Field(3.0, gt=0, description="gamma of L = ReLU(gamma - KL_H) (reference pipeline default 3; "
                             "its inference script and the paper's appendix use 1)")
    kernel: int = Field(7, ge=1, description="Gaussian smoothing kernel size, odd (reference 7)")
    sigma: float = Field(REFERENCE_SIGMA, gt=0, description="standard deviation of the Gaussian smoothing, as "
                         "torchvision's gaussian_blur takes it; sqrt(2) is the reference's sigma 1, whose "
                         "Attend-and-Excite kernel exp(-((x-mu)/(2 sigma))^2) has standard deviation sqrt(2)*sigma")
    border: Literal["same", "reference"] = Field(
        "same", description="same: reflect-padded blur keeping the map's size (torchvision); reference: pad 1 "
        "(reflect) and keep only the blur's valid part, side + 2 - (kernel - 1) (24 -> 20 at kernel 7, as the "
        "reference; needs side + 2 >= kernel)")
    symmetric: bool = Field(False, description="False: KL(P_i||P_j) for i < j, as the reference code; True: both "
                            "directions (i != j), as Algorithm 1 writes it")
    step_size: float = Field(20.0, gt=0, description="eta scale: step i moves the latent by "
                             "step_size*sqrt(linspace(start, end, total steps)[i])*grad (reference scale_factor 20)")
    step_size_range: tuple[float, float] = Field(
        (1.0, 0.5), description="(start, end) of that linspace over all denoising steps (reference scale_range)")
    map_resolution: int | None = Field(
        None, ge=1, description="side of the cross-attention layers whose maps the loss reads (averaged over "
        "those layers, heads and each concept's two tokens). None: the layers whose side is nearest a quarter "
        "of the latent side, ties to the larger: 24 on SD 2.1 at 768 px (the reference's RES 24), 16 on SD 1.x "
        "at 512 px, 4 on the toy base at 64 px (16x16 latents), 8 on embedded:tiny-sd (16 and 8 only)")

    @field_validator("kernel")
    @classmethod
    def _odd_kernel(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"the Gaussian kernel size must be odd, got {value}")
        return value

    @property
    def active(self) -> bool:
        return self.enabled and self.steps > 0
