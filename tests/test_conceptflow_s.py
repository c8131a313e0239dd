"""ConceptFlow-S: Eq. 5 loss, DisenBooth image adapter and cosine, the training method on the tiny base."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from conceptflow.methods.conceptflow_s.image_adapter import ImageAdapter
from conceptflow.adapters.tokens import expand_prompt, layer_token
from conceptflow.attention.processor import CrossAttentionMapRecorder
from conceptflow.config import ConceptFlowSTrainConfig
from conceptflow.models.loading import load_base_pipeline
from conceptflow.train.common import denoising_loss, prepare_concept_training, sample_batch
from conceptflow.methods.conceptflow_s.reader import krona_wed_deltas
from conceptflow.methods.conceptflow_s.trainer import ConceptFlowSMethod
from conceptflow.train.loop import run_training, step_generator
from conceptflow.methods.conceptflow_s.losses import attention_regularisation_loss, disentangle_cosine

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("one_torch_thread")]


def _square_mask(size: int = 8) -> torch.Tensor:
    mask = torch.zeros(2, size, size)
    mask[0, 2:6, 1:5] = 1
    mask[1, 0:3, 3:8] = 1
    return mask


# --- Eq. 5 ---------------------------------------------------------------------------------

def test_attention_loss_is_zero_at_its_targets():
    mask = _square_mask()
    ca_rand = torch.rand(mask.shape, generator=torch.Generator().manual_seed(0)) * mask  # free inside M only
    for reduction in ("mean", "sum"):
        assert attention_regularisation_loss(ca_rand, mask.clone(), mask, reduction) == 0
        assert attention_regularisation_loss(ca_rand, mask.clone(), mask.unsqueeze(1), reduction) == 0


@pytest.mark.parametrize("reduction, divisor", [("sum", 1), ("mean", 64)])
def test_attention_loss_matches_eq5_by_hand(reduction, divisor):
    mask = _square_mask()
    ca_rand = torch.full_like(mask, 0.3)  # 0.3 everywhere: penalised only outside M
    ca_class = torch.zeros_like(mask)  # misses all of M
    outside, inside = (1 - mask).flatten(1).sum(1), mask.flatten(1).sum(1)
    expected = (0.5 * (0.09 * outside + inside) / divisor).mean()
    assert torch.allclose(attention_regularisation_loss(ca_rand, ca_class, mask, reduction), expected)


def test_attention_loss_falls_when_optimised_alone():
    mask = _square_mask()
    generator = torch.Generator().manual_seed(1)
    ca_rand = torch.nn.Parameter(torch.rand(mask.shape, generator=generator))
    ca_class = torch.nn.Parameter(torch.rand(mask.shape, generator=generator))
    optimizer = torch.optim.Adam([ca_rand, ca_class], lr=0.05)
    start = float(attention_regularisation_loss(ca_rand, ca_class, mask))
    for _ in range(150):
        loss = attention_regularisation_loss(ca_rand, ca_class, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss) < 1e-2 * start
    assert torch.allclose(ca_class.detach(), mask, atol=0.05)  # V_class matches M
    assert (ca_rand.detach() * (1 - mask)).abs().max() < 0.05  # V_rand leaves the background
    inside = ca_rand.detach()[mask.bool()]
    assert inside.std() > 0.1  # ... and is free inside M (not pulled to anything)


# --- DisenBooth's image adapter and contrastive term --------------------------------------------

def test_image_adapter_is_identity_plus_mlp_of_half_the_embedding_at_init():
    torch.manual_seed(0)
    adapter = ImageAdapter(8)
    embedding = torch.randn(3, 8)
    assert torch.equal(torch.sigmoid(adapter.mask), torch.full((8,), 0.5))
    expected = 0.5 * embedding + adapter.mlp(0.5 * embedding)
    assert torch.allclose(adapter(embedding), expected)
    assert isinstance(adapter.skip, torch.nn.Identity)

    adapter(embedding).square().sum().backward()
    for name, parameter in adapter.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_image_adapter_maps_image_width_to_text_width():
    adapter = ImageAdapter(8, text_dim=12)
    out = adapter(torch.randn(2, 8))
    assert out.shape == (2, 12)
    out.sum().backward()
    assert adapter.mask.grad.abs().sum() > 0 and adapter.skip.weight.grad.abs().sum() > 0


def test_disentangle_cosine_uses_the_token_mean_of_the_text():
    generator = torch.Generator().manual_seed(2)
    image = torch.randn(2, 16, generator=generator)
    text = torch.randn(2, 77, 16, generator=generator)
    text = text - text.mean(dim=1, keepdim=True) + image[:, None]  # token mean == image feature
    assert torch.allclose(disentangle_cosine(text, image), torch.tensor(1.0))
    assert torch.allclose(disentangle_cosine(text, -image), torch.tensor(-1.0))
    layerwise = torch.stack([text, -text], dim=1)  # per layer +1 and -1
    assert torch.allclose(disentangle_cosine(layerwise, image), torch.tensor(0.0), atol=1e-6)


# --- the method on the tiny base ---------------------------------------------------------------

@pytest.fixture(scope="module")
def concept_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("concept")
    images, masks = [], []
    for index in range(3):
        pixels = np.full((64, 64, 3), 30 + 20 * index, np.uint8)
        pixels[16:48, 12 + 4 * index:44 + 4 * index] = (210, 60, 40)
        mask = np.zeros((64, 64), np.uint8)
        mask[16:48, 12 + 4 * index:44 + 4 * index] = 255
        Image.fromarray(pixels).save(folder / f"{index}.png")
        Image.fromarray(mask).save(folder / f"{index}_mask.png")
        images.append(folder / f"{index}.png")
        masks.append(folder / f"{index}_mask.png")
    return images, masks


def _method(concept_files, **overrides) -> ConceptFlowSMethod:
    torch.manual_seed(0)
    pipeline = load_base_pipeline("embedded:tiny-sd")
    images, masks = concept_files
    setup = prepare_concept_training(pipeline, "toy", "dog", images, masks, 64, seed=0)
    config = ConceptFlowSTrainConfig(**{"steps": 3, "batch_size": 2, "log_every": 1, **overrides})
    return ConceptFlowSMethod(setup, config)


def _is_krona(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("kron_a", "kron_b", "magnitude")


def test_gradients_reach_exactly_the_trained_parameters(concept_files):
    method = _method(concept_files)
    setup = method.setup
    n_attention = len(setup.controller.layers)
    assert len(method.krona_modules) == 4 * n_attention  # to_q, to_k, to_v, to_out.0 of attn1 and attn2
    assert {p.rsplit(".", 2)[-2] if p.endswith("out.0") else p.rsplit(".", 1)[-1] for p in method.krona_modules} \
        == {"to_q", "to_k", "to_v", "to_out"}

    # One step first: B starts at zero, which leaves A's gradient zero at step 0.
    optimizer = torch.optim.AdamW(method.parameter_groups(), weight_decay=0.0)
    method.loss(0, step_generator(0, 0))[0].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    method.loss(1, step_generator(0, 1))[0].backward()

    def touched(model):
        return {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}

    expected_unet = {f"{path}.{s}" for path in method.krona_modules for s in ("kron_a", "kron_b", "magnitude")}
    assert touched(setup.unet) == expected_unet
    assert {n for n, p in setup.unet.named_parameters() if p.requires_grad} == expected_unet
    assert not any(p.requires_grad for p in setup.text_encoder.parameters())
    assert not any(p.requires_grad for p in setup.pipeline.vae.parameters())
    assert setup.embeddings.weight.grad.abs().sum() > 0
    assert touched(method.image_adapter) == {n for n, _ in method.image_adapter.named_parameters()}
    grouped = {id(p) for group in method.parameter_groups() for p in group["params"]}
    trainable = [setup.embeddings.weight, *method.image_adapter.parameters(),
                 *(p for n, p in setup.unet.named_parameters() if _is_krona(n))]
    assert grouped == {id(p) for p in trainable}
    assert [g["lr"] for g in method.parameter_groups()] == [1e-3, 5e-4, 1e-3]


def test_loss_terms_combine_and_attention_comes_from_the_text_only_pass(concept_files):
    method = _method(concept_files, weight_text_only=0.5, weight_disentangle=0.25, weight_attention=2.0)
    loss, logs = method.loss(0, step_generator(0, 0))
    expected = (logs["loss_denoise"] + 0.5 * logs["loss_text_only"] + 0.25 * logs["cosine"]
                + 2.0 * logs["loss_attention"])
    assert math.isclose(float(loss), expected, rel_tol=1e-5)
    assert logs["loss_attention"] > 0

    setup = method.setup
    batch = sample_batch(setup, 2, step_generator(0, 0))  # the same batch the step drew
    ids = setup.tokenizer(expand_prompt(batch.prompts[0], 0, ["toy"]), padding="max_length", max_length=77).input_ids
    rand_position, class_position = method._token_positions(batch.prompts)[0].tolist()
    # Map 0 is V_rand (<toy1>, random init), map 1 is V_class (<toy2>, class-word init).
    assert setup.tokenizer.convert_ids_to_tokens([ids[rand_position], ids[class_position]]) == \
        [layer_token("toy", 1, 0), layer_token("toy", 2, 0)]
    text = setup.encode(batch.prompts)
    image = method.image_adapter(method.image_embeddings[batch.indices])

    def attention_loss(hidden):
        recorder = CrossAttentionMapRecorder(method._token_positions(batch.prompts))
        with torch.no_grad(), setup.controller.use(recorder):
            setup.unet(batch.noisy_latents, batch.timesteps, encoder_hidden_states=hidden)
        maps = recorder.mean_map(batch.masks.shape[-1])
        return float(attention_regularisation_loss(maps[:, 0], maps[:, 1], batch.masks[:, 0]))

    with torch.no_grad():  # Eq. 22: f_i added to every token of every layer
        prediction = setup.unet(batch.noisy_latents, batch.timesteps,
                                encoder_hidden_states=text + image[:, None, None]).sample
    assert math.isclose(logs["loss_denoise"], float(denoising_loss(prediction, batch, masked=True)), rel_tol=1e-6)
    assert not math.isclose(logs["loss_denoise"], logs["loss_text_only"], rel_tol=1e-6)

    # The tiny random UNet barely moves its maps when f_i is added (~2e-4 relative), hence tight tolerances.
    assert math.isclose(logs["loss_attention"], attention_loss(text), rel_tol=1e-6)
    assert not math.isclose(logs["loss_attention"], attention_loss(text + image[:, None, None]), rel_tol=2e-5)


def test_training_runs_and_exported_deltas_are_merged_minus_base(concept_files, tmp_path):
    method = _method(concept_files)
    history = run_training(method, 3, seed=0, checkpoint_root=tmp_path, run_key="k", checkpoint_every=100,
                           log_every=1)
    assert len(history) == 3 and all(math.isfinite(r["loss"]) for r in history)
    assert all(math.isfinite(r[k]) for r in history for k in ("loss_attention", "cosine", "loss_text_only"))

    tensors, meta = method.export()
    setup = method.setup
    assert meta["kron_factor"] == 16 and meta["image_encoder"] == "embedded:tiny-clip"
    assert sorted(k.removeprefix("embedding.") for k in tensors if k.startswith("embedding.")) \
        == sorted(setup.token_strings)
    assert {k for k in tensors if k.startswith("image_adapter.")} \
        == {f"image_adapter.{k}" for k in method.image_adapter.state_dict()}

    fresh = load_base_pipeline("embedded:tiny-sd")
    deltas = krona_wed_deltas(tensors, meta, fresh)  # embeddings and image adapter are ignored
    assert set(deltas) == {f"unet.{path}" for path in method.krona_modules}
    changed = 0
    for path, module in method.krona_modules.items():
        base = fresh.unet.get_submodule(path).weight.detach()
        assert torch.equal(base, module.base_layer.weight)  # training left W0 alone
        a, b, m = (tensors[f"unet.{path}.{s}"] for s in ("kron_a", "kron_b", "magnitude"))
        direction = base + torch.kron(a, b)
        by_hand = m[:, None] * direction / direction.norm(dim=1, keepdim=True) - base  # Eq. 2
        delta = deltas[f"unet.{path}"]
        assert torch.allclose(delta, module.merged_weight().detach() - base, atol=1e-6)
        assert torch.allclose(delta, by_hand, atol=1e-5)
        changed += int(delta.abs().max() > 1e-6)
    assert changed == len(method.krona_modules)
    # W0 read through the trained pipeline's wrapped layers gives the same deltas.
    for key, delta in krona_wed_deltas(tensors, meta, setup.pipeline).items():
        assert torch.equal(delta, deltas[key])


def test_resume_reproduces_an_uninterrupted_run(concept_files, tmp_path):
    def train(folder, stop_after=None):
        method = _method(concept_files, steps=4)
        run_training(method, 4, seed=3, checkpoint_root=folder, run_key="k", checkpoint_every=100, log_every=1,
                     stop_after=stop_after)
        return method.export()[0]

    uninterrupted = train(tmp_path / "a")
    train(tmp_path / "b", stop_after=2)
    resumed = train(tmp_path / "b")
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), key
    assert uninterrupted["image_adapter.mask"].abs().min() > 0  # trained away from its zero init
