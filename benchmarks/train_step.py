"""Training-step time of KronA-WED against peft LoRA (rank 4) on the same UNet and batch.

One step = forward + denoising MSE + backward + AdamW step, on random latents and text
embeddings shaped for the base (tiny-sd: 4×16×16 latents, 77×32 text states). Three
variants are timed in one process, interleaved round by round so that load from other
processes hits them alike, after a warm-up:

* ``krona``    KronA-WED (factor 16) on every attention linear, default ``forward_mode="auto"``
  (on the tiny base every call takes the materialised form);
* ``krona-f``  the same forced to the factored form;
* ``lora``     peft LoRA rank 4 on to_q/to_k/to_v/to_out.0.

``--sd-layers`` adds a layer-set benchmark: one self- and one cross-attention module
(diffusers ``Attention``, 8 heads) at each SD-1.x width (320/640/1280, text states 77×768),
batch 1 with the token counts of a 256-px latent, same three variants. The per-step times are medians over rounds. The last line is
``ratio krona_wed/lora = <x>`` (tiny UNet, default forward). Runs single-threaded unless
``--threads`` says otherwise: on the shared 2-core development machine a 2-thread torch
stalls behind other processes (seconds per step instead of ~0.1 s), which swamps the
comparison.

Measured on the development machine (1 thread, other jobs running): tiny UNet, batch 4 —
KronA-WED 156 ms, factored-only 196 ms, LoRA 153 ms per step, ratio 1.02 (0.86 in an earlier
run); SD-sized attention set — KronA-WED 320 ms, factored-only 401 ms, LoRA 291 ms, ratio 1.10.

Usage: ``python benchmarks/train_step.py [--rounds 8] [--steps 5] [--sd-layers]``
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import DDPMScheduler, UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import Attention  # noqa: E402
from peft import LoraConfig, inject_adapter_in_model  # noqa: E402
from torch import nn  # noqa: E402

from conceptflow.methods.conceptflow_s.krona_wed import inject_krona_wed  # noqa: E402
from conceptflow.models.embedded import embedded_model_path  # noqa: E402

ATTENTION_LINEARS = ["to_q", "to_k", "to_v", "to_out.0"]


def add_peft_lora(model: nn.Module, rank: int = 4) -> nn.Module:
    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=ATTENTION_LINEARS, lora_dropout=0.0)
    return inject_adapter_in_model(config, model)


def make_variants(base: nn.Module) -> dict[str, nn.Module]:
    krona, krona_factored = copy.deepcopy(base), copy.deepcopy(base)
    inject_krona_wed(krona)
    inject_krona_wed(krona_factored, forward_mode="factored")
    for model in (krona, krona_factored):  # non-zero B, as after a few training steps
        for name, parameter in model.named_parameters():
            if name.endswith("kron_b"):
                nn.init.normal_(parameter, std=1e-3)
    return {"krona": krona, "krona-f": krona_factored, "lora": add_peft_lora(copy.deepcopy(base))}


def unet_step_fn(unet: nn.Module, batch_size: int, seed: int = 0):
    """A closure running one training step of ``unet`` on a fixed random batch."""
    generator = torch.Generator().manual_seed(seed)
    config = unet.config
    latents = torch.randn(batch_size, config.in_channels, config.sample_size, config.sample_size,
                          generator=generator)
    text_states = torch.randn(batch_size, 77, config.cross_attention_dim, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (batch_size,), generator=generator)
    noisy = DDPMScheduler(num_train_timesteps=1000).add_noise(latents, noise, timesteps)
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4)
    unet.train()

    def step() -> None:
        prediction = unet(noisy, timesteps, encoder_hidden_states=text_states).sample
        F.mse_loss(prediction, noise).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


class SDAttentionLayerSet(nn.Module):
    """One SD-1.x self- and cross-attention module (diffusers ``Attention``) at each width."""

    def __init__(self, widths=(320, 640, 1280), tokens=(1024, 256, 64), text_dim: int = 768,
                 text_tokens: int = 77, batch_size: int = 1) -> None:
        super().__init__()
        self.self_attentions = nn.ModuleList(
            Attention(width, heads=8, dim_head=width // 8, out_bias=True) for width in widths)
        self.cross_attentions = nn.ModuleList(
            Attention(width, cross_attention_dim=text_dim, heads=8, dim_head=width // 8, out_bias=True)
            for width in widths)
        self.inputs = [torch.randn(batch_size, token_count, width, requires_grad=True)
                       for width, token_count in zip(widths, tokens)]
        self.text = torch.randn(batch_size, text_tokens, text_dim, requires_grad=True)

    def forward(self) -> torch.Tensor:
        loss = torch.zeros(())
        for self_attention, cross_attention, hidden in zip(self.self_attentions, self.cross_attentions, self.inputs):
            hidden = self_attention(hidden)
            hidden = cross_attention(hidden, encoder_hidden_states=self.text)
            loss = loss + hidden.square().mean()
        return loss


def layer_set_step_fn(layer_set: nn.Module):
    optimizer = torch.optim.AdamW([p for p in layer_set.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        layer_set().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def interleaved_times(steps: dict[str, callable], rounds: int, steps_per_round: int,
                      warmup: int) -> dict[str, list[float]]:
    """Per-step seconds of each variant, one entry per round, the order rotating per round."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    names = list(steps)
    times = {name: [] for name in names}
    for round_index in range(rounds):
        order = names[round_index % len(names):] + names[:round_index % len(names)]
        for name in order:
            start = time.perf_counter()
            for _ in range(steps_per_round):
                steps[name]()
            times[name].append((time.perf_counter() - start) / steps_per_round)
    return times


def report(title: str, times: dict[str, list[float]]) -> dict[str, float]:
    print(f"== {title}: seconds per step, by round")
    medians = {}
    for name, values in times.items():
        medians[name] = statistics.median(values)
        per_round = " ".join(f"{value * 1e3:7.1f}" for value in values)
        print(f"{name:8s} median {medians[name] * 1e3:7.1f} ms | rounds (ms): {per_round}")
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--sd-layers", action="store_true", help="also time SD-sized attention linears")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    if args.sd_layers:
        layer_variants = make_variants(SDAttentionLayerSet())
        times = interleaved_times({name: layer_set_step_fn(model) for name, model in layer_variants.items()},
                                  max(2, args.rounds // 2), 2, 1)
        sd_medians = report("SD-sized attention modules (320/640/1280, attn1 + attn2 each)", times)
        print(f"sd-layers ratio krona_wed/lora = {sd_medians['krona'] / sd_medians['lora']:.3f}, "
              f"factored-only/auto = {sd_medians['krona-f'] / sd_medians['krona']:.3f}")

    base = UNet2DConditionModel.from_pretrained(embedded_model_path("embedded:tiny-sd"), subfolder="unet")
    variants = make_variants(base)
    times = interleaved_times({name: unet_step_fn(model, args.batch_size) for name, model in variants.items()},
                              args.rounds, args.steps, args.warmup)
    medians = report(f"tiny UNet training step, batch {args.batch_size}", times)
    print(f"tiny factored-only/auto = {medians['krona-f'] / medians['krona']:.3f}")
    print(f"ratio krona_wed/lora = {medians['krona'] / medians['lora']:.3f}")


if __name__ == "__main__":
    main()
