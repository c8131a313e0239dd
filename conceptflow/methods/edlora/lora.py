"""LoRA through peft, with Mix-of-Show's convention: out = W x + alpha * up(down(x)).

peft scales by lora_alpha / r, so ``lora_alpha = alpha * rank`` makes alpha a plain
multiplier as in Mix-of-Show. The merged update of a layer is ``alpha * B @ A``; it is
computed from the saved tensors alone, so fusion and sampling never need peft.
"""

from __future__ import annotations

from typing import Mapping

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict

UNET_ATTENTION_LINEARS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj")


def add_lora(model: torch.nn.Module, target_modules, rank: int, alpha: float) -> torch.nn.Module:
    """Inject trainable LoRA (B zero-initialised, so the model is unchanged at start)."""
    config = LoraConfig(r=rank, lora_alpha=alpha * rank, target_modules=list(target_modules),
                        lora_dropout=0.0, init_lora_weights=True)
    return inject_adapter_in_model(config, model)


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``<module path>.lora_A.weight`` / ``.lora_B.weight`` tensors of an injected model."""
    return {key: value.detach().clone() for key, value in get_peft_model_state_dict(model).items()}


def load_lora_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    result = set_peft_model_state_dict(model, dict(state))
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"LoRA tensors do not fit this model: {unexpected[:3]} ...")


def lora_deltas(state: Mapping[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """Merged updates ``{module path: alpha * B @ A}`` from LoRA tensors."""
    deltas = {}
    for key, down in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module_path = key.removesuffix(".lora_A.weight")
        up = state[f"{module_path}.lora_B.weight"]
        deltas[module_path] = alpha * (up.float() @ down.float())
    return deltas
