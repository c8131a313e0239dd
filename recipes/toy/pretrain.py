"""Pretrain the toy base: a tiny SD-1.x pipeline that draws what toy-world captions ask for.

Same architecture and code path as real SD 1.x (``AutoencoderKL``, ``CLIPTextModel`` with the
real CLIP vocabulary, ``UNet2DConditionModel``, a DPM-Solver scheduler), built by
``conceptflow.models.embedded.build_tiny_sd_pipeline`` at ``TOY_SIZE`` and trained on the toy
world in two stages:

1. VAE: reconstruction ``|x - D(E(x))|_1 + MSE`` plus a tiny KL term, on the scene stream; then
   ``scaling_factor = 1 / std(latents)`` so scaled latents have unit variance (SD's 0.18215
   plays this role for the real VAE).
2. Text encoder + UNet together (VAE frozen): the DDPM epsilon loss
   ``E |eps - eps_theta(sqrt(a_t) z + sqrt(1 - a_t) eps, t, c)|^2`` on captioned scenes, weighted
   by min-SNR-gamma (Hang et al. 2023: ``min(SNR_t, gamma) / SNR_t``), which speeds up
   convergence; 10 % of captions are empty so classifier-free guidance works. The saved weights
   are an exponential moving average of the trained ones (diffusers' ``EMAModel``), which
   draws cleaner shapes than the last iterate after a short, high-learning-rate run.

Every batch is a pure function of (seed, stage, step) (scenes from a numpy generator, noise from
``conceptflow.seeding.step_generator``), so a run is reproducible and resumes from its last
checkpoint exactly; ``minutes`` caps wall time (the run stops at a checkpoint and can be resumed
by calling again with the same folder). Checkpoints are written atomically
(``conceptflow.fileio.atomic_path``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from conceptflow.fileio import atomic_path
from conceptflow.models.embedded import TinySDSize, build_tiny_sd_pipeline
from conceptflow.models.tokenizer import build_clip_tokenizer
from conceptflow.seeding import step_generator
from conceptflow.toy.concepts import with_unnamed_instances
from conceptflow.toy.world import IMAGE_SIZE, Scene, caption, render, sample_scene

TOY_SIZE = TinySDSize(
    unet_channels=(32, 64, 128),  # 16x16, 8x8, 4x4: a third level costs ~25 % more than two and holds 4x the weights
    unet_layers_per_block=1,
    unet_attention_heads=2,  # 16/32-dim heads: ~35 % faster on a CPU than 8 heads of 4/8 dims
    text_hidden=64,
    text_layers=3,
    text_intermediate=256,
    text_heads=4,
    vae_channels=(16, 32, 32),
    image_size=IMAGE_SIZE,
)
CHECKPOINT_DIR = "checkpoints"


@dataclass(frozen=True)
class PretrainConfig:
    """Settings of a toy-base pretraining run (recorded in the model card)."""

    seed: int = 0
    vae_steps: int = 4000
    vae_batch_size: int = 8
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    # Objects cover ~10-25 % of a scene, so a plain loss learns the background first and leaves
    # shapes blurred and colours washed out; from this step on, object pixels weigh 1 + w.
    vae_foreground_start: int = 0
    vae_foreground_weight: float = 4.0
    latent_scenes: int = 20000  # scenes encoded once for stage 2; captions are re-drawn per use
    unet_steps: int = 8000
    batch_size: int = 32
    unet_lr: float = 1e-3
    text_lr: float = 5e-4
    warmup_steps: int = 200
    final_lr_fraction: float = 0.1  # cosine decay to this fraction of the peak
    min_snr_gamma: float = 5.0
    # Objects cover a small part of a scene; latent pixels are weighted 1 + w * object coverage
    # (renormalised per image) so the loss is not dominated by the easy background.
    object_loss_weight: float = 0.0
    # The saved weights are an exponential moving average of the trained ones (diffusers'
    # EMAModel, (1 + n) / (10 + n) warm-up capped at this decay); 0 saves the raw weights.
    ema_decay: float = 0.999
    # Each object is, with this probability, an unnamed instance (a random multi-tone look of its
    # shape) captioned by its shape alone: "a star" then covers many stars, as a real base's class
    # word does, and the VAE learns to carry the two- and three-tone fills concepts have (a VAE
    # trained on vocabulary looks only turned a yellow/purple zig-zag star into orange blobs).
    unnamed_instance_probability: float = 0.25
    caption_drop_probability: float = 0.25  # each optional caption word group left out
    unconditional_probability: float = 0.1
    checkpoint_every: int = 250
    threads: int = 1  # this is a shared CPU: one thread avoids oversubscription
    size: TinySDSize = field(default_factory=lambda: TOY_SIZE)


@dataclass
class PretrainResult:
    folder: Path
    complete: bool
    vae_steps_done: int
    unet_steps_done: int
    seconds: float
    final_vae_loss: float | None
    final_denoising_loss: float | None


# --- data -----------------------------------------------------------------------------------

def _rng(config: PretrainConfig, stage: int, step: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, stage, step])


def to_pixels(images) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) in [-1, 1], the VAE's input range."""
    arrays = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1.0


def pretraining_scene(config: PretrainConfig, rng: np.random.Generator) -> Scene:
    scene = sample_scene(rng)
    if config.unnamed_instance_probability > 0:
        scene = with_unnamed_instances(scene, rng, config.unnamed_instance_probability)
    return scene


def scene_batch(config: PretrainConfig, stage: int, step: int, batch_size: int, with_masks: bool = False):
    """(pixels, captions[, object masks (N, 1, H, W)]) of step ``step`` of ``stage``: the same
    arguments give the same batch."""
    rng = _rng(config, stage, step)
    scenes = [pretraining_scene(config, rng) for _ in range(batch_size)]
    captions = [caption(s, rng, config.caption_drop_probability) for s in scenes]
    drawn = [render(s) for s in scenes]
    pixels = to_pixels([d.image for d in drawn])
    if not with_masks:
        return pixels, captions
    return pixels, captions, object_masks(drawn)


def object_masks(drawn) -> torch.Tensor:
    """(N, 1, H, W) float: 1 where any object of each rendered scene is visible."""
    return torch.from_numpy(np.stack([np.any(d.masks, axis=0) if d.masks else np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
                                      for d in drawn])).float()[:, None]


# --- losses ---------------------------------------------------------------------------------

def vae_loss(vae, pixels: torch.Tensor, kl_weight: float, generator: torch.Generator | None = None,
             pixel_weights: torch.Tensor | None = None) -> torch.Tensor:
    """L1 + MSE reconstruction of a sampled latent (each pixel weighted by ``pixel_weights``,
    default 1), plus ``kl_weight`` * KL(q(z|x) || N(0, I))."""
    posterior = vae.encode(pixels).latent_dist
    reconstruction = vae.decode(posterior.sample(generator)).sample
    error = (reconstruction - pixels).abs() + (reconstruction - pixels) ** 2
    recon = (error * pixel_weights).mean() if pixel_weights is not None else error.mean()
    return recon + kl_weight * posterior.kl().mean() / pixels[0].numel()


def encode_captions(tokenizer, text_encoder, captions) -> torch.Tensor:
    """CLIP hidden states of captions padded to 77 tokens, as StableDiffusionPipeline does."""
    tokens = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt")
    return text_encoder(tokens.input_ids)[0]


def denoising_loss(unet, text_encoder, tokenizer, noise_scheduler, latents: torch.Tensor, captions,
                   generator: torch.Generator, min_snr_gamma: float | None = 5.0,
                   latent_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The epsilon-prediction loss at random timesteps, min-SNR-gamma weighted per sample;
    ``latent_weights`` (N, 1, h, w) weigh latent pixels (default 1)."""
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, encode_captions(tokenizer, text_encoder, captions)).sample
    error = F.mse_loss(prediction, noise, reduction="none")
    if latent_weights is not None:
        error = error * latent_weights / latent_weights.mean(dim=(1, 2, 3), keepdim=True)
    per_sample = error.mean(dim=(1, 2, 3))
    if min_snr_gamma:
        alphas = noise_scheduler.alphas_cumprod[timesteps]
        snr = alphas / (1 - alphas)
        per_sample = per_sample * torch.clamp(snr, max=min_snr_gamma) / snr
    return per_sample.mean()


def _cosine_with_warmup(warmup: int, total: int, final_fraction: float):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


# --- checkpoints ----------------------------------------------------------------------------

def _save_atomically(payload: dict, path: Path) -> None:
    with atomic_path(path, keep_name=True) as staging:  # torch.save names its archive after the file
        torch.save(payload, staging)


def _load(path: Path) -> dict | None:
    return torch.load(path, weights_only=True) if path.is_file() else None  # tensors and plain values only


# --- stages ---------------------------------------------------------------------------------

def _progress(total: int, initial: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=description, disable=not enabled, mininterval=5.0)


def train_vae(vae, config: PretrainConfig, checkpoints: Path, deadline: float, progress: bool = True):
    """Stage 1; returns (steps done, last loss). Resumes from ``checkpoints/vae.pt``."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    state = _load(checkpoints / "vae.pt")
    step, loss_value = 0, None
    if state:
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, loss_value = state["step"], state["loss"]
    vae.train()
    bar = _progress(config.vae_steps, step, "toy VAE", progress)
    while step < config.vae_steps and time.monotonic() < deadline:
        pixels, _, masks = scene_batch(config, 1, step, config.vae_batch_size, with_masks=True)
        generator = step_generator(config.seed, step)
        weight = config.vae_foreground_weight if step >= config.vae_foreground_start else 0.0
        loss = vae_loss(vae, pixels, config.vae_kl_weight, generator, 1.0 + weight * masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        step += 1
        loss_value = loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        if step % config.checkpoint_every == 0 or step == config.vae_steps:
            _save_atomically({"model": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                              "loss": loss_value}, checkpoints / "vae.pt")
    bar.close()
    _save_atomically({"model": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                      "loss": loss_value}, checkpoints / "vae.pt")
    vae.eval()
    return step, loss_value


@torch.no_grad()
def encode_scene_bank(vae, config: PretrainConfig, checkpoints: Path) -> dict:
    """Encode ``latent_scenes`` scenes once (posterior mean and std) and set the VAE's
    ``scaling_factor`` to 1 / std of the latents; cached in ``checkpoints/latents.pt``."""
    rng = _rng(config, 2, 0)
    scenes = [pretraining_scene(config, rng) for _ in range(config.latent_scenes)]  # seeded: rebuilt, never unpickled
    cached = _load(checkpoints / "latents.pt")
    if cached:
        vae.register_to_config(scaling_factor=cached["scaling_factor"])
        return {**cached, "scenes": scenes}
    means, stds, coverages = [], [], []
    for start in range(0, len(scenes), 64):
        drawn = [render(s) for s in scenes[start:start + 64]]
        posterior = vae.encode(to_pixels([d.image for d in drawn])).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
        coverages.append(F.adaptive_avg_pool2d(object_masks(drawn), posterior.mean.shape[-2:]))
    mean, std, coverage = torch.cat(means), torch.cat(stds), torch.cat(coverages)
    scaling_factor = float(1.0 / (mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))).std())
    vae.register_to_config(scaling_factor=scaling_factor)
    bank = {"mean": mean, "std": std, "object_coverage": coverage, "scenes": scenes, "scaling_factor": scaling_factor}
    _save_atomically({key: value for key, value in bank.items() if key != "scenes"}, checkpoints / "latents.pt")
    return bank


def train_denoiser(pipeline, bank: dict, config: PretrainConfig, checkpoints: Path, deadline: float,
                   progress: bool = True):
    """Stage 2 (text encoder + UNet); returns (steps done, last loss). Resumes from
    ``checkpoints/denoiser.pt``."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    unet, text_encoder, tokenizer = pipeline.unet, pipeline.text_encoder, pipeline.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    optimizer = torch.optim.AdamW([
        {"params": unet.parameters(), "lr": config.unet_lr},
        {"params": text_encoder.parameters(), "lr": config.text_lr},
    ], weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _cosine_with_warmup(config.warmup_steps, config.unet_steps, config.final_lr_fraction))
    trained = [*unet.parameters(), *text_encoder.parameters()]
    ema = EMAModel(trained, decay=config.ema_decay) if config.ema_decay else None
    state = _load(checkpoints / "denoiser.pt")
    step, loss_value, recent = 0, None, []
    if state:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        step, loss_value = state["step"], state["loss"]
    unet.train()
    text_encoder.train()
    scale = bank["scaling_factor"]
    bar = _progress(config.unet_steps, step, "toy UNet+text", progress)

    def checkpoint():
        _save_atomically({"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                          "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                          "ema": ema.state_dict() if ema is not None else None,
                          "step": step, "loss": loss_value}, checkpoints / "denoiser.pt")

    while step < config.unet_steps and time.monotonic() < deadline:
        rng = _rng(config, 3, step)
        index = rng.integers(0, len(bank["scenes"]), size=config.batch_size)
        captions = [caption(bank["scenes"][i], rng, config.caption_drop_probability)
                    if rng.random() >= config.unconditional_probability else "" for i in index]
        generator = step_generator(config.seed, step)
        latents = (bank["mean"][index] + bank["std"][index] * torch.randn(
            bank["mean"][index].shape, generator=generator)) * scale
        weights = 1.0 + config.object_loss_weight * bank["object_coverage"][index] if config.object_loss_weight else None
        loss = denoising_loss(unet, text_encoder, tokenizer, noise_scheduler, latents, captions, generator,
                              config.min_snr_gamma, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        schedule.step()
        if ema is not None:
            ema.step(trained)
        step += 1
        recent = (recent + [loss.item()])[-50:]
        loss_value = float(np.mean(recent))
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        if step % config.checkpoint_every == 0:
            checkpoint()
    bar.close()
    checkpoint()
    if ema is not None:
        ema.copy_to(trained)  # the pipeline saved next holds the averaged weights
    unet.eval()
    text_encoder.eval()
    return step, loss_value


# --- the whole run --------------------------------------------------------------------------

def build_toy_pipeline(folder: Path, size: TinySDSize = TOY_SIZE):
    """The untrained toy pipeline (seeded), with the real CLIP tokenizer."""
    tokenizer = build_clip_tokenizer(folder / "tokenizer_build")
    return build_tiny_sd_pipeline(tokenizer, size)


def pretrain_toy_base(out_dir: str | Path, minutes: float | None = 60.0, config: PretrainConfig = PretrainConfig(),
                      progress: bool = True) -> PretrainResult:
    """Pretrain the toy base into ``out_dir`` (diffusers format + README.md model card).

    Resumes from ``out_dir/checkpoints`` when it exists. ``minutes`` caps this call's wall
    time (None: no cap); an unfinished run still saves its current weights and says so in the
    card. ``recipes.toy.build.build_toy_assets`` (``conceptflow pretrain-toy``) calls this.
    """
    import shutil

    out_dir = Path(out_dir)
    checkpoints = out_dir / CHECKPOINT_DIR
    checkpoints.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    started = time.monotonic()
    deadline = math.inf if minutes is None else started + minutes * 60.0
    try:
        pipeline = build_toy_pipeline(checkpoints)
        vae_done, vae_loss_value = train_vae(pipeline.vae, config, checkpoints, deadline, progress)
        unet_done, unet_loss_value = 0, None
        if vae_done >= config.vae_steps:
            pipeline.vae.requires_grad_(False)
            bank = encode_scene_bank(pipeline.vae, config, checkpoints)
            unet_done, unet_loss_value = train_denoiser(pipeline, bank, config, checkpoints, deadline, progress)
        # float16 on disk: the committed base stays under 20 MB (the text encoder's 49408-token CLIP
        # embedding table alone is 12.6 MB in float32); loaders cast back to the catalog's dtype
        pipeline.to(dtype=torch.float16).save_pretrained(out_dir, safe_serialization=True)
        shutil.rmtree(checkpoints / "tokenizer_build", ignore_errors=True)
    finally:
        torch.set_num_threads(previous_threads)
    seconds = time.monotonic() - started
    history = _record_session(out_dir, seconds, vae_done, unet_done)
    result = PretrainResult(out_dir, vae_done >= config.vae_steps and unet_done >= config.unet_steps,
                            vae_done, unet_done, seconds, vae_loss_value, unet_loss_value)
    write_model_card(out_dir, config, result, history)
    return result


def _record_session(out_dir: Path, seconds: float, vae_done: int, unet_done: int) -> list[dict]:
    """Append this call's wall time to ``pretrain_sessions.json`` (a resumed run has several)."""
    path = out_dir / "pretrain_sessions.json"
    sessions = json.loads(path.read_text()) if path.is_file() else []
    sessions.append({"seconds": round(seconds, 1), "vae_steps_done": vae_done, "unet_steps_done": unet_done,
                     })
    path.write_text(json.dumps(sessions, indent=2) + "\n")
    return sessions


def _weights_megabytes(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors") if CHECKPOINT_DIR not in p.parts) / 1e6


def write_model_card(out_dir: Path, config: PretrainConfig, result: PretrainResult, sessions: list[dict]) -> Path:
    """README.md beside the weights: what the model is, how it was trained, how long it took."""
    total_minutes = sum(s["seconds"] for s in sessions) / 60
    status = "complete" if result.complete else "INCOMPLETE (resume with the same command)"
    lines = [
        "# conceptflow toy base",
        "",
        "A tiny Stable-Diffusion-1.x pipeline (diffusers format: AutoencoderKL, CLIPTextModel with the",
        "real CLIP vocabulary, UNet2DConditionModel, DPM-Solver) pretrained from scratch on the",
        "conceptflow toy world (`conceptflow.toy.world`): 64 px scenes of one to three coloured, patterned",
        "shapes on plain or gradient backgrounds, with template captions such as",
        "\"a small red striped star on the left and a big blue circle on the right, on a sand background\".",
        "It exists so that personalisation can be judged on a CPU; it knows nothing outside that world.",
        "",
        "## How it was made",
        "",
        f"- Command: `conceptflow pretrain-toy --out {out_dir.name}` "
        "(`recipes.toy.pretrain.pretrain_toy_base`), seed " f"{config.seed}.",
        f"- Status: {status}; VAE steps {result.vae_steps_done}/{config.vae_steps}, "
        f"UNet+text steps {result.unet_steps_done}/{config.unet_steps}.",
        f"- Wall time: {total_minutes:.1f} min over {len(sessions)} session(s) on a shared 2-core CPU, "
        f"{config.threads} torch thread(s).",
        f"- Stage 1, VAE: batch {config.vae_batch_size}, AdamW lr {config.vae_lr}, L1 + MSE + "
        f"{config.vae_kl_weight} x KL, object pixels weighted x{1 + config.vae_foreground_weight:g} from step "
        f"{config.vae_foreground_start}; final loss {result.final_vae_loss}.",
        f"- Data for both stages: each object is, with probability {config.unnamed_instance_probability}, an "
        "unnamed instance (a random two- or three-tone look of its shape) captioned by its shape alone.",
        f"- Scaling factor 1/std of {config.latent_scenes} encoded scene latents.",
        f"- Stage 2, text encoder + UNet: batch {config.batch_size}, AdamW lr {config.unet_lr} (UNet) / "
        f"{config.text_lr} (text), {config.warmup_steps} warm-up steps then cosine to "
        f"{config.final_lr_fraction} of the peak, epsilon loss with min-SNR gamma {config.min_snr_gamma}, "
        f"captions with optional words dropped (p={config.caption_drop_probability}) and "
        f"{config.unconditional_probability:.0%} empty, latent pixels weighted 1 + {config.object_loss_weight:g} x object "
        f"coverage; the saved weights are the EMA (decay {config.ema_decay:g}) of the trained ones; final loss "
        f"(mean of last 50 steps) {result.final_denoising_loss}.",
        f"- Sizes: {json.dumps(asdict(config.size))}.",
        f"- Weights: {_weights_megabytes(out_dir):.1f} MB of safetensors (float16 on disk, loaded as float32), "
        "evaluators included.",
    ]
    if (out_dir / "evaluators").is_dir():
        lines += ["", "## Evaluators", "",
                  "`evaluators/recogniser` (shape/colour pairs, shapes, object count) and `evaluators/identity`",
                  "(contrastive instance embedding): small CNNs trained on the generator's ground truth by",
                  "`recipes.toy.evaluators`; load with `conceptflow.toy.evaluators`' `ToyRecogniser(folder)` /",
                  "`ToyIdentityEncoder(folder)`."]
    path = out_dir / "README.md"
    path.write_text("\n".join(lines) + "\n")
    (out_dir / "pretrain_config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    return path


def add_measurements_to_card(out_dir: str | Path, measured: dict[str, object]) -> Path:
    """Append (or replace) the card's "Measured" section, e.g. with benchmarks/toy_quality.py figures."""
    path = Path(out_dir) / "README.md"
    text = path.read_text().split("\n## Measured")[0].rstrip("\n")
    lines = ["", "", "## Measured (benchmarks/toy_quality.py)", ""] + [f"- {k}: {v}" for k, v in measured.items()]
    path.write_text(text + "\n".join(lines) + "\n")
    return path
