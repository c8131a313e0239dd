"""kohya-ss key names of SD 1.x adapter tensors (what A1111, ComfyUI and diffusers read).

kohya names a module by its diffusers path with every ``.`` replaced by ``_``, after a prefix
naming the model: ``lora_unet_`` for the UNet, ``lora_te_`` for the (single, SD 1.x) CLIP text
encoder. A LoRA module ``n`` has three tensors:

    n.lora_down.weight   A (rank, in)
    n.lora_up.weight     B (out, rank)
    n.alpha              a scalar; the update is (alpha / rank) · B @ A

diffusers' ``load_lora_weights`` maps these back with
``diffusers.loaders.lora_conversion_utils._convert_non_diffusers_lora_to_diffusers`` (the
underscores are undone by a list of known SD names: ``down_blocks``, ``transformer_blocks``,
``to_out.0``, ``text_model``, ``self_attn``, ``q_proj`` ...), A1111's ``extensions-builtin/Lora``
and ComfyUI's ``comfy/lora.py`` by the same underscore form of the module path.
"""

from __future__ import annotations

from typing import Mapping

import torch

MODEL_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te"}
DOWN, UP, ALPHA = "lora_down.weight", "lora_up.weight", "alpha"


def kohya_name(model_name: str, module_path: str) -> str:
    """``("unet", "down_blocks.0....attn1.to_q")`` → ``lora_unet_down_blocks_0_..._attn1_to_q``."""
    if model_name not in MODEL_PREFIXES:
        raise ValueError(f"kohya keys exist for {sorted(MODEL_PREFIXES)}, not {model_name!r}")
    return f"{MODEL_PREFIXES[model_name]}_{module_path}".replace(".", "_")


def kohya_lora_tensors(model_name: str, module_path: str, down: torch.Tensor, up: torch.Tensor,
                       multiplier: float) -> dict[str, torch.Tensor]:
    """The three kohya tensors of one LoRA whose update is ``multiplier · up @ down``.

    kohya scales by alpha / rank, so alpha = multiplier · rank. Tensors are float32, contiguous.
    """
    rank = down.shape[0]
    if up.shape[1] != rank:
        raise ValueError(f"{module_path}: lora_up {tuple(up.shape)} does not match lora_down {tuple(down.shape)}")
    name = kohya_name(model_name, module_path)
    return {f"{name}.{DOWN}": down.detach().float().contiguous(),
            f"{name}.{UP}": up.detach().float().contiguous(),
            f"{name}.{ALPHA}": torch.tensor(float(multiplier) * rank)}


def kohya_delta(tensors: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    """The merged update (alpha / rank) · up @ down of kohya module ``name`` (as the loaders compute it)."""
    down, up = tensors[f"{name}.{DOWN}"].float(), tensors[f"{name}.{UP}"].float()
    alpha = float(tensors.get(f"{name}.{ALPHA}", torch.tensor(float(down.shape[0]))))
    return (alpha / down.shape[0]) * (up @ down)
