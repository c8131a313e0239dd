"""DDIM inversion of a layout reference image, recording the self-attention keys layout alignment
compares against (Concept Conductor: keys at ``up_blocks.1.attentions.0`` attn1).

The reference code inverts with 999 DDIM steps and keeps the latents of every timestep. Ours
inverts on the sampling schedule's own timesteps (``substeps`` DDIM steps per interval between
two of them; 1 by default), with the base model and the base prompt, no classifier-free
guidance, and keeps only what alignment reads: at each sampling timestep t the keys of the UNet
call on the inverted latent at t (the call that also predicts the noise for the next inversion
step). Textbook DDIM inversion from the VAE's mean latent (level alpha = 1)::

    eps = unet(x_t, t);  x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t);  x_t' = sqrt(a_t') x0 + sqrt(1 - a_t') eps

Results are cached by a hash of the image's pixels, the prompt, the timesteps, the layer, the
resolution and a fingerprint of the base's weights: in memory for the process, and on disk
(``<folder>/<hash>.safetensors``, never a pickle) when a cache folder is given.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conceptflow.attention.processor import AttentionHook, StopForward
from conceptflow.fileio import atomic_path

_MEMORY: dict[str, dict] = {}  # cache key -> inverted keys, the newest MEMORY_ENTRIES kept
MEMORY_ENTRIES = 32  # SD 1.5 at 512 px keeps 2.6 MB of keys per aligned step: bounded, not one per image forever


def _remember(key: str, result: dict) -> dict:
    _MEMORY.pop(key, None)
    _MEMORY[key] = result
    while len(_MEMORY) > MEMORY_ENTRIES:
        del _MEMORY[next(iter(_MEMORY))]
    return result


class KeyRecorder(AttentionHook):
    """Records the keys (B, heads, N, d) of one attention layer, with their graph if ``keep_graph``;
    ``stop`` raises ``StopForward`` right after, so that the rest of the UNet does not run."""

    def __init__(self, layer_name: str, keep_graph: bool = False, stop: bool = False):
        self.layer_name = layer_name
        self.keep_graph = keep_graph
        self.stop = stop
        self.keys: torch.Tensor | None = None

    def edit_key_value(self, layer, query, key, value, context):
        if layer.name == self.layer_name:
            self.keys = key if self.keep_graph else key.detach()
            if self.stop:
                raise StopForward
        return key, value


class ProbsRecorder(AttentionHook):
    """Head-mean attention probabilities (N, N) of one layer for the first sample, while ``active``."""

    def __init__(self, layer_name: str | None):
        self.layer_name = layer_name
        self.active = False
        self.probs: torch.Tensor | None = None

    def wants_probs(self, layer):
        return self.active and layer.name == self.layer_name

    def on_probs(self, layer, probs):
        self.probs = probs[0].mean(0).detach().float().cpu()


def inversion_grid(timesteps: Sequence[int], substeps: int = 1) -> list[int]:
    """Ascending inversion timesteps: each interval between consecutive sampling timesteps (from 0)
    split into ``substeps`` steps, every sampling timestep included."""
    points = sorted(int(t) for t in timesteps)
    grid, previous = [], 0
    for t in points:
        grid.extend(int(round(v)) for v in np.linspace(previous, t, substeps + 1)[1:])
        previous = t
    return sorted(set(grid))


def image_latent(pipeline, image: Image.Image, resolution: int) -> torch.Tensor:
    """The VAE's mean latent (scaled) of ``image`` resized to resolution x resolution, float32."""
    vae = pipeline.vae
    array = np.asarray(image.convert("RGB").resize((resolution, resolution), Image.BICUBIC), dtype=np.float32)
    pixels = torch.from_numpy(array / 127.5 - 1).permute(2, 0, 1)[None].to(vae.device, vae.dtype)
    with torch.no_grad():
        return (vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor).float()


def _fingerprint(pipeline, layer_name: str) -> str:
    unet = pipeline.unet
    tensors = [unet.conv_in.weight, unet.conv_out.weight, unet.get_submodule(layer_name).to_k.weight,
               pipeline.vae.encoder.conv_in.weight, pipeline.text_encoder.get_input_embeddings().weight[:1024]]
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def cache_key(pipeline, image: Image.Image, prompt: str, timesteps: Sequence[int], layer_name: str,
              resolution: int, substeps: int, mask_layer: str | None = None, mask_timestep: int | None = None) -> str:
    digest = hashlib.sha256()
    rgb = image.convert("RGB")
    digest.update(repr(rgb.size).encode())
    digest.update(rgb.tobytes())
    digest.update(repr((prompt, [int(t) for t in timesteps], layer_name, resolution, substeps, mask_layer,
                        mask_timestep)).encode())
    digest.update(_fingerprint(pipeline, layer_name).encode())
    return digest.hexdigest()[:32]


@torch.no_grad()
def invert_keys(core, image: Image.Image, prompt: str, timesteps: Sequence[int], layer_name: str, resolution: int,
                substeps: int = 1, cache_dir: Path | None = None, mask_layer: str | None = None,
                mask_timestep: int | None = None) -> dict:
    """``{"keys": {sampling timestep: keys (heads, N, d)}, "mask_probs": (N', N') or None}`` of
    ``image``'s DDIM inversion, float32 on the CPU; ``mask_probs`` are the head-mean self-attention
    probabilities of ``mask_layer`` at ``mask_timestep`` (a sampling timestep), when asked for."""
    key = cache_key(core.pipeline, image, prompt, timesteps, layer_name, resolution, substeps, mask_layer,
                    mask_timestep)
    path = None if cache_dir is None else Path(cache_dir) / f"{key}.safetensors"
    if key in _MEMORY:
        result = _MEMORY[key]
    elif path is not None and path.is_file():
        return _remember(key, _from_tensors(load_file(str(path))))
    else:
        result = _invert(core, image, prompt, {int(t) for t in timesteps}, layer_name, resolution, substeps,
                         mask_layer, mask_timestep)
        _remember(key, result)
    if path is not None and not path.is_file():  # safetensors, never a pickle; also what memory had
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as temporary:
            save_file(_to_tensors(result), str(temporary))
    return result


def _to_tensors(result: dict) -> dict[str, torch.Tensor]:
    tensors = {f"keys.{t}": k.contiguous() for t, k in result["keys"].items()}
    if result["mask_probs"] is not None:
        tensors["mask_probs"] = result["mask_probs"].contiguous()
    return tensors


def _from_tensors(tensors: dict[str, torch.Tensor]) -> dict:
    keys = {int(name.removeprefix("keys.")): value for name, value in tensors.items() if name.startswith("keys.")}
    return {"keys": keys, "mask_probs": tensors.get("mask_probs")}


def _invert(core, image, prompt, wanted: set[int], layer_name, resolution, substeps, mask_layer=None,
            mask_timestep=None) -> dict:
    pipeline = core.pipeline
    alphas = pipeline.scheduler.alphas_cumprod.double()
    text = core.encode([prompt])
    x = image_latent(pipeline, image, resolution).double()
    recorder, probs = KeyRecorder(layer_name), ProbsRecorder(mask_layer)
    keys: dict[int, torch.Tensor] = {}
    grid = inversion_grid(sorted(wanted), substeps)
    a_current, t_current = torch.tensor(1.0, dtype=torch.float64), 0

    def call(t: int) -> torch.Tensor:
        probs.active = mask_layer is not None and t == mask_timestep
        eps = core.unet(x.to(core.model_dtype), torch.tensor(t, device=x.device), encoder_hidden_states=text).sample
        if t in wanted:
            keys[t] = recorder.keys[0].float().cpu()
        return eps.double()

    with core.controller.use(recorder, probs):
        for t_next in grid:
            eps = call(t_current)
            x0 = (x - (1 - a_current).sqrt() * eps) / a_current.sqrt()
            a_current, t_current = alphas[t_next], t_next
            x = a_current.sqrt() * x0 + (1 - a_current).sqrt() * eps
        call(t_current)
    return {"keys": keys, "mask_probs": probs.probs}
