"""Mixed-precision training and gradient checkpointing, for every registered method.

bf16 autocast runs on the CPU: a bf16 step must give a loss close to the float32 step's, keep
the trainable parameters (and what is saved) in float32 and train; fp16 adds a grad scaler whose
state is checkpointed; gradient checkpointing must not change the loss or the gradients.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conceptflow.attention.processor import enable_hooked_gradient_checkpointing
from conceptflow.methods import METHODS, get_method
from conceptflow.models.loading import load_base_pipeline
from conceptflow.train.common import prepare_concept_training
from conceptflow.train.loop import run_training
from conceptflow.train.precision import Precision, base_dtype_name, trainable_in_float32

# bf16 keeps 8 mantissa bits: the tiny base's masked denoising loss (~1) moves by a few 1e-3.
BF16_LOSS_TOLERANCE = 0.05  # relative


@pytest.fixture(scope="module")
def concept_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    paths, masks = [], []
    for index in range(3):
        array = np.full((64, 64, 3), 230, np.uint8)
        array[16:48, 12 + 4 * index: 44 + 4 * index] = (200, 40, 60)
        paths.append(folder / f"{index}.png")
        Image.fromarray(array).save(paths[-1])
        masks.append(folder / f"m{index}.png")
        Image.fromarray(((array[..., 1] < 100) * 255).astype(np.uint8)).save(masks[-1])
        # a second concept's masks for the methods that learn groups: everything but the first's
        Image.fromarray(((array[..., 1] >= 100) * 255).astype(np.uint8)).save(folder / f"n{index}.png")
    return paths, masks


def build(method: str, concept_images, mixed_precision: str = "no", **overrides):
    spec = get_method(method)
    config = spec.config(batch_size=2, mixed_precision=mixed_precision, **overrides)
    torch.manual_seed(0)
    pipeline = load_base_pipeline("embedded:tiny-sd", "cpu", base_dtype_name(mixed_precision, "float32"))
    paths, masks = concept_images
    if spec.trains_groups:  # two concepts learnt together from the same photos, each with its own mask
        from conceptflow.methods.textual_localization.group_setup import GroupMember, prepare_group_training

        members = [GroupMember("toy", "box", tuple(masks)),
                   GroupMember("mug", "cup", tuple(m.with_name("n" + m.name[1:]) for m in masks))]
        setup = prepare_group_training(pipeline, "pair", members, paths, [None] * len(paths), 64, 32, seed=0)
    else:
        setup = prepare_concept_training(pipeline, "toy", "box", paths, masks, 64, seed=0)
    if config.gradient_checkpointing:
        enable_hooked_gradient_checkpointing(pipeline.unet)
    trainer = spec.build_trainer(setup, config, "cpu")
    trainable_in_float32(p for group in trainer.parameter_groups() for p in group["params"])
    return setup, trainer


def step_loss(trainer, precision: Precision) -> torch.Tensor:
    with precision.autocast():
        loss, _ = trainer.loss(0, torch.Generator().manual_seed(7))
    return loss


@pytest.mark.parametrize("method", sorted(METHODS))
def test_bf16_step_is_close_to_float32_and_keeps_float32_parameters(method, concept_images, tiny_sd_path,
                                                                    one_torch_thread):
    _, full = build(method, concept_images)
    setup, half = build(method, concept_images, "bf16")
    trainable = {id(p) for g in half.parameter_groups() for p in g["params"]}
    frozen_text = [p for p in setup.text_encoder.parameters() if id(p) not in trainable]  # cones2 trains it all
    assert setup.unet.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in frozen_text)
    reference = float(step_loss(full, Precision()).detach())
    loss = step_loss(half, Precision("bf16"))
    assert abs(float(loss.detach()) - reference) <= BF16_LOSS_TOLERANCE * abs(reference), (float(loss.detach()), reference)

    optimizer = torch.optim.AdamW(half.parameter_groups(), weight_decay=0.0)
    before = {id(p): p.detach().clone() for g in half.parameter_groups() for p in g["params"]}
    Precision("bf16").backward_and_step(loss, optimizer)
    trained = [p for g in half.parameter_groups() for p in g["params"]]
    assert all(p.dtype == torch.float32 for p in trained)
    assert any(not torch.equal(p.detach(), before[id(p)]) for p in trained), "the bf16 step changed nothing"
    for state in optimizer.state.values():
        assert all(v.dtype == torch.float32 for k, v in state.items() if torch.is_tensor(v) and k != "step")
    tensors, _ = half.export()
    assert tensors and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())


def test_fp16_scales_the_loss_and_checkpoints_the_scaler(concept_images, tiny_sd_path, one_torch_thread, tmp_path):
    _, trainer = build("edlora", concept_images, "fp16")
    precision = Precision("fp16")
    history = run_training(trainer, 2, 0, tmp_path, "key", checkpoint_every=1, log_every=1, precision=precision)
    assert len(history) == 2 and all(np.isfinite(row["loss"]) for row in history)
    progress = json.loads((tmp_path / "checkpoint" / "progress.json").read_text())
    assert progress["grad_scaler"]["scale"] == precision.scaler.get_scale()
    tensors, _ = trainer.export()
    assert all(t.dtype == torch.float32 for t in tensors.values())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_gradient_checkpointing_changes_neither_loss_nor_gradients(method, concept_images, tiny_sd_path,
                                                                   one_torch_thread):
    results = []
    for checkpointing in (False, True):
        setup, trainer = build(method, concept_images, gradient_checkpointing=checkpointing)
        setup.unet.train()  # as diffusers' scripts do; checkpointing is active whenever grads are
        loss = step_loss(trainer, Precision())
        loss.backward()
        grads = [p.grad.clone() if p.grad is not None else None
                 for g in trainer.parameter_groups() for p in g["params"]]
        results.append((float(loss), grads))
    (loss_plain, grads_plain), (loss_checkpointed, grads_checkpointed) = results
    assert loss_checkpointed == pytest.approx(loss_plain, rel=1e-6, abs=1e-7)
    for plain, checkpointed in zip(grads_plain, grads_checkpointed):
        assert (plain is None) == (checkpointed is None)
        if plain is not None:
            torch.testing.assert_close(checkpointed, plain, rtol=1e-4, atol=1e-6)
