"""Mask backends: the weight-free saliency backend, GroundingDINO→SAM on tiny random models
saved as checkpoint files, RMBG pre/post-processing and its opt-in, and backend selection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conceptflow.config import MaskConfig
from conceptflow.data.masks.base import file_md5
from conceptflow.data.masks.saliency import SaliencyMaskBackend, centred_ellipse
from conceptflow.errors import ModelUnavailableError

DREAMBOOTH_DIR = Path("/work/shared/data/dreambooth")


def iou(mask: np.ndarray, truth: np.ndarray) -> float:
    predicted = mask > 0.5
    return float((predicted & truth).sum() / (predicted | truth).sum())


def synthetic_scene(background: str, touches_bottom: bool = False, seed: int = 0):
    """A striped red 'animal' (ellipse body + ear) on a plain, gradient or noisy background."""
    rng = np.random.default_rng(seed)
    height, width = 160, 200
    rows, cols = np.mgrid[0:height, 0:width]
    if background == "plain":
        pixels = np.ones((height, width, 3)) * [200, 210, 220]
    elif background == "gradient":
        top_weight = (rows / height)[..., None]
        pixels = (1 - top_weight) * [230, 200, 150] + top_weight * [90, 120, 170]
    else:
        noise = rng.normal(0, 12, (height, width, 3))
        pixels = np.ones((height, width, 3)) * [120, 140, 110] + noise
    centre_row = 0.75 if touches_bottom else 0.55
    truth = ((cols - 0.52 * width) / (0.22 * width)) ** 2 + (
        (rows - centre_row * height) / (0.3 * height)
    ) ** 2 <= 1
    truth |= (abs(cols - 0.45 * width) < 0.05 * width) & (rows > (centre_row - 0.4) * height) & (
        rows < (centre_row - 0.15) * height
    )
    subject = np.ones((height, width, 3)) * [180, 40, 50]
    subject[..., 1] += (cols % 20 < 10) * 60
    pixels = np.where(truth[..., None], subject, pixels)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), truth


# --- saliency (no weights) ---------------------------------------------------------------


@pytest.mark.parametrize(
    "background, touches_bottom",
    [("plain", False), ("gradient", False), ("noisy", False), ("plain", True), ("gradient", True)],
)
def test_saliency_recovers_synthetic_subject(background, touches_bottom):
    image, truth = synthetic_scene(background, touches_bottom)
    mask = SaliencyMaskBackend().predict(image, "animal")
    assert mask.dtype == np.float32 and mask.shape == truth.shape
    assert set(np.unique(mask)) <= {0.0, 1.0}
    assert iou(mask, truth) > 0.9


def test_saliency_without_grabcut_still_finds_plain_subject():
    image, truth = synthetic_scene("plain")
    assert iou(SaliencyMaskBackend(use_grabcut=False).predict(image, "animal"), truth) > 0.85


def test_saliency_is_deterministic_and_size_preserving():
    image, _ = synthetic_scene("noisy", seed=3)
    image = image.resize((333, 211))
    backend = SaliencyMaskBackend(working_size=128)
    first, second = backend.predict(image, "x"), backend.predict(image, "x")
    assert first.shape == (211, 333)
    np.testing.assert_array_equal(first, second)


def test_saliency_falls_back_to_centred_ellipse_on_featureless_image():
    image = Image.new("RGB", (120, 90), (128, 128, 128))
    mask = SaliencyMaskBackend().predict(image, "thing")
    expected = centred_ellipse(90, 120)
    assert iou(mask, expected) > 0.97
    assert mask[45, 60] == 1.0 and mask[0, 0] == 0.0


def test_saliency_accepts_non_rgb_modes():
    image, truth = synthetic_scene("plain")
    mask = SaliencyMaskBackend().predict(image.convert("RGBA"), "animal")
    assert iou(mask, truth) > 0.9


@pytest.mark.skipif(
    not DREAMBOOTH_DIR.is_dir(), reason=f"DreamBooth photos not found at {DREAMBOOTH_DIR}"
)
@pytest.mark.parametrize("subject", ["backpack", "can", "dog6", "duck_toy", "teapot", "robot_toy"])
def test_saliency_on_real_dreambooth_photos(subject):
    photo = DREAMBOOTH_DIR / subject / "00.jpg"
    if not photo.exists():
        pytest.skip(f"{photo} is missing")
    image = Image.open(photo).convert("RGB")
    image.thumbnail((512, 512))
    mask = SaliencyMaskBackend().predict(image, subject)
    area = float(mask.mean())
    assert 0.01 < area < 0.9
    # the saliency path found the subject itself, not the degenerate-case ellipse
    assert iou(mask, centred_ellipse(*mask.shape)) < 0.9


# --- GroundingDINO -> SAM on tiny random models saved as checkpoint files --------------------

TINY_SAM_TYPE = "tiny_test"
TINY_BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?", "a", "dog", "cat", "toy"]


def build_tiny_sam():
    """segment-anything's Sam at toy size (~190 k params): the registry's builder signature."""
    from functools import partial

    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    return Sam(
        image_encoder=ImageEncoderViT(
            depth=2, embed_dim=64, img_size=256, mlp_ratio=4, num_heads=2, patch_size=16,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=[1], window_size=4, out_chans=32,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=32, image_embedding_size=(16, 16), input_image_size=(256, 256),
            mask_in_chans=4,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64, num_heads=2),
            transformer_dim=32, iou_head_depth=3, iou_head_hidden_dim=32,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()


def write_tiny_groundingdino_config(folder: Path) -> Path:
    """The package's official SwinT config with a local tiny BERT and fewer layers/queries
    (hidden_dim stays 256, the backbone stays Swin-T: the architecture needs both)."""
    import re

    import groundingdino
    from transformers import BertConfig, BertModel, BertTokenizer

    bert_dir = folder / "tiny-bert"
    bert_dir.mkdir(parents=True)
    (bert_dir / "vocab.txt").write_text("\n".join(TINY_BERT_VOCAB) + "\n")
    BertTokenizer(str(bert_dir / "vocab.txt")).save_pretrained(bert_dir)
    BertModel(
        BertConfig(
            vocab_size=len(TINY_BERT_VOCAB), hidden_size=32, num_hidden_layers=1,
            num_attention_heads=2, intermediate_size=64, max_position_embeddings=512,
        )
    ).save_pretrained(bert_dir)
    official = Path(groundingdino.__file__).parent / "config" / "GroundingDINO_SwinT_OGC.py"
    text = official.read_text()
    for key, value in [
        ("text_encoder_type", f'"{bert_dir}"'), ("enc_layers", "1"), ("dec_layers", "2"),
        ("num_queries", "50"),
    ]:
        text, count = re.subn(rf"^{key} = .*$", f"{key} = {value}", text, flags=re.M)
        assert count == 1, key
    config_path = folder / "GroundingDINO_tiny.py"
    config_path.write_text(text)
    return config_path


@pytest.fixture(scope="module")
def tiny_grounded_sam(tmp_path_factory):
    """Tiny random GroundingDINO and SAM, saved as checkpoint files in the official layouts."""
    from groundingdino.models import build_model
    from groundingdino.util.slconfig import SLConfig
    from segment_anything import sam_model_registry

    folder = tmp_path_factory.mktemp("grounded_sam")
    torch.manual_seed(0)
    config_path = write_tiny_groundingdino_config(folder)
    args = SLConfig.fromfile(str(config_path))
    args.device = "cpu"
    detector = build_model(args).eval()
    detector_path = folder / "groundingdino_tiny.pth"
    torch.save({"model": detector.state_dict()}, detector_path)  # the release's layout
    sam = build_tiny_sam()
    sam_path = folder / "sam_tiny.pth"
    torch.save(sam.state_dict(), sam_path)  # SAM releases are bare state dicts
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sam_model_registry, TINY_SAM_TYPE, lambda checkpoint=None: build_tiny_sam())
        yield {
            "config": config_path, "detector_checkpoint": detector_path, "detector": detector,
            "sam_checkpoint": sam_path, "sam": sam,
        }


@pytest.fixture(scope="module")
def grounded_sam_backend(tiny_grounded_sam):
    from conceptflow.data.masks.grounded_sam import GroundedSamMaskBackend

    config = MaskConfig(
        backend="grounded_sam",
        groundingdino_config=str(tiny_grounded_sam["config"]),
        groundingdino_checkpoint=str(tiny_grounded_sam["detector_checkpoint"]),
        sam_checkpoint=str(tiny_grounded_sam["sam_checkpoint"]),
        sam_model_type=TINY_SAM_TYPE,
    )
    return GroundedSamMaskBackend.from_config(config, detection_short_side=128)


def assert_same_weights(loaded: torch.nn.Module, saved: torch.nn.Module) -> None:
    loaded_state, saved_state = loaded.state_dict(), saved.state_dict()
    assert loaded_state.keys() == saved_state.keys()
    for name, tensor in saved_state.items():
        torch.testing.assert_close(loaded_state[name], tensor, rtol=0, atol=0, msg=name)


def test_grounded_sam_loads_the_checkpoint_weights(tiny_grounded_sam, grounded_sam_backend):
    """Every weight comes from the files (a fresh random init would differ everywhere)."""
    assert_same_weights(grounded_sam_backend.detector, tiny_grounded_sam["detector"])
    assert_same_weights(grounded_sam_backend.predictor.model, tiny_grounded_sam["sam"])
    assert not grounded_sam_backend.detector.training


def test_grounded_sam_prompts_sam_with_the_best_box(
    tiny_grounded_sam, grounded_sam_backend, monkeypatch
):
    """The box SAM gets is the detector's highest-scoring query, converted to pixels, and the
    mask is SAM's own answer for that box."""
    from segment_anything import SamPredictor

    recorded = {}
    handle = grounded_sam_backend.detector.register_forward_hook(
        lambda module, inputs, outputs: recorded.update(outputs)
    )
    monkeypatch.setattr(grounded_sam_backend, "box_threshold", 0.0)
    image, _ = synthetic_scene("gradient")
    try:
        mask = grounded_sam_backend.predict(image, "dog")
    finally:
        handle.remove()
    detection = grounded_sam_backend.last_detection
    assert mask.shape == (160, 200) and mask.dtype == np.float32
    assert set(np.unique(mask)) <= {0.0, 1.0}
    assert not detection.is_fallback

    # re-derive the box from the raw detector outputs: score = max sigmoid over text tokens
    scores = recorded["pred_logits"][0].sigmoid().max(dim=-1).values
    cx, cy, w, h = recorded["pred_boxes"][0, int(scores.argmax())].tolist()
    expected_box = (
        max(0.0, (cx - w / 2) * 200), max(0.0, (cy - h / 2) * 160),
        min(200.0, (cx + w / 2) * 200), min(160.0, (cy + h / 2) * 160),
    )
    assert detection.score == pytest.approx(float(scores.max()))
    assert detection.box_xyxy == pytest.approx(expected_box)
    reference = SamPredictor(tiny_grounded_sam["sam"])
    reference.set_image(np.asarray(image))
    expected, _, _ = reference.predict(box=np.array(detection.box_xyxy), multimask_output=False)
    np.testing.assert_array_equal(mask, expected[0].astype(np.float32))


def test_grounded_sam_falls_back_to_whole_image_box(grounded_sam_backend, monkeypatch, caplog):
    monkeypatch.setattr(grounded_sam_backend, "box_threshold", 1.01)  # sigmoid scores never pass
    image, _ = synthetic_scene("plain")
    mask = grounded_sam_backend.predict(image, "cat")
    detection = grounded_sam_backend.last_detection
    assert detection.is_fallback and detection.box_xyxy == (0.0, 0.0, 200.0, 160.0)
    assert mask.shape == (160, 200)
    assert "no 'cat' box" in caplog.text


def test_box_conversion_to_pixels():
    from conceptflow.data.masks.grounded_sam import cxcywh_to_xyxy_pixels

    box = torch.tensor([0.5, 0.25, 0.2, 0.5])
    assert cxcywh_to_xyxy_pixels(box, 200, 100) == pytest.approx((80.0, 0.0, 120.0, 50.0))
    # a box reaching past the border is clipped to the image
    wide = torch.tensor([0.9, 0.5, 0.4, 1.2])
    assert cxcywh_to_xyxy_pixels(wide, 100, 100) == pytest.approx((70.0, 0.0, 100.0, 100.0))


def test_grounded_sam_describe_hashes_the_files(tiny_grounded_sam, grounded_sam_backend):
    description = grounded_sam_backend.describe()
    assert description["backend"] == "grounded_sam"
    assert description["sam_model_type"] == TINY_SAM_TYPE
    assert description["sam_checkpoint_md5"] == file_md5(tiny_grounded_sam["sam_checkpoint"])
    assert description["groundingdino_checkpoint_md5"] == file_md5(
        tiny_grounded_sam["detector_checkpoint"]
    )
    assert description["no_box_fallback"] == "whole-image box"


def test_sam_loads_from_safetensors(tiny_grounded_sam, tmp_path):
    from safetensors.torch import save_file

    from conceptflow.data.masks.grounded_sam import load_sam

    path = tmp_path / "sam_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_grounded_sam["sam"].state_dict().items()}, path)
    sam = load_sam(TINY_SAM_TYPE, str(path))
    for name, tensor in tiny_grounded_sam["sam"].state_dict().items():
        torch.testing.assert_close(sam.state_dict()[name], tensor)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("sam_checkpoint", None, "mask.sam_checkpoint is not set"),
        ("sam_checkpoint", "/nonexistent/sam_vit_h_4b8939.pth", "file not found"),
        ("groundingdino_checkpoint", "/nonexistent/gd.pth", "mask.groundingdino_checkpoint"),
        ("groundingdino_config", None, "mask.groundingdino_config is not set"),
    ],
)
def test_grounded_sam_names_missing_files(tiny_grounded_sam, field, value, message):
    from conceptflow.data.masks.grounded_sam import GroundedSamMaskBackend

    paths = {
        "groundingdino_config": str(tiny_grounded_sam["config"]),
        "groundingdino_checkpoint": str(tiny_grounded_sam["detector_checkpoint"]),
        "sam_checkpoint": str(tiny_grounded_sam["sam_checkpoint"]),
        field: value,
    }
    with pytest.raises(ModelUnavailableError, match=message):
        GroundedSamMaskBackend(**paths, sam_model_type=TINY_SAM_TYPE)


def test_sam_refuses_wrong_or_unsafe_checkpoints(tiny_grounded_sam, tmp_path):
    from conceptflow.data.masks.grounded_sam import load_sam

    with pytest.raises(ModelUnavailableError, match="lacks .* weights"):
        load_sam(TINY_SAM_TYPE, str(tiny_grounded_sam["detector_checkpoint"]))
    with pytest.raises(ModelUnavailableError, match="sam_model_type = 'vit_x'"):
        load_sam("vit_x", str(tiny_grounded_sam["sam_checkpoint"]))
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": {"weight": torch.zeros(1)}, "hook": UnsafeObject()}, pickled)
    with pytest.raises(ModelUnavailableError, match="weights-only"):
        load_sam(TINY_SAM_TYPE, str(pickled))


class UnsafeObject:
    """Stands for arbitrary pickled code in a checkpoint: must never be unpickled."""


# --- RMBG-1.4: pre/post-processing, the opt-in, the unavailable error ------------------------


def test_rmbg_preprocess_matches_the_model_card_recipe():
    from torchvision.transforms.functional import normalize

    from conceptflow.data.masks.rmbg import rmbg_preprocess

    rgb = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    pixels = rmbg_preprocess(rgb)
    assert pixels.shape == (1, 3, 1024, 1024) and pixels.dtype == torch.float32
    # BRIA's example: interpolate (bilinear) -> /255 -> torchvision normalize(mean 0.5, std 1.0)
    resized = torch.nn.functional.interpolate(
        torch.tensor(rgb, dtype=torch.float32).permute(2, 0, 1)[None], (1024, 1024), mode="bilinear"
    )
    torch.testing.assert_close(pixels, normalize(resized / 255.0, [0.5] * 3, [1.0] * 3))
    assert -0.5 <= float(pixels.min()) and float(pixels.max()) <= 0.5
    white = rmbg_preprocess(np.full((4, 4, 3), 255, np.uint8))
    torch.testing.assert_close(white, torch.full_like(white, 0.5))


def test_rmbg_postprocess_upsamples_and_min_max_normalises():
    from conceptflow.data.masks.rmbg import rmbg_postprocess

    prediction = torch.tensor([[0.2, 0.2, 0.2], [0.8, 0.8, 0.8]]).reshape(1, 1, 2, 3)
    mask = rmbg_postprocess(prediction, image_size=(6, 4))  # PIL order: (width, height)
    assert mask.shape == (4, 6) and mask.dtype == np.float32
    # bilinear x2 (half-pixel centres): rows 0.2, 0.35, 0.65, 0.8 -> min-max -> 0, .25, .75, 1
    np.testing.assert_allclose(mask[:, 0], [0.0, 0.25, 0.75, 1.0], atol=1e-6)
    assert np.ptp(mask, axis=1).max() < 1e-6  # constant along each row
    flat = rmbg_postprocess(torch.full((1, 1, 8, 8), 0.7), image_size=(5, 3))
    np.testing.assert_array_equal(flat, np.zeros((3, 5), np.float32))


class BrightnessMatte(torch.nn.Module):
    """Stands in for BriaRMBG: returns ([sigmoid maps, finest first], [features]) as it does."""

    def __init__(self):
        super().__init__()
        self.seen_shapes = []

    def forward(self, pixels):
        self.seen_shapes.append(tuple(pixels.shape))
        finest = torch.sigmoid(8 * pixels.mean(dim=1, keepdim=True))
        coarse = torch.nn.functional.avg_pool2d(finest, 2)
        return [finest, coarse], [pixels]


def test_rmbg_backend_turns_the_model_output_into_a_mask():
    from conceptflow.data.masks.rmbg import RmbgMaskBackend

    image = Image.new("RGB", (90, 60), (20, 20, 20))
    image.paste((240, 240, 240), (30, 20, 60, 40))  # a bright 30 x 20 subject
    model = BrightnessMatte()
    backend = RmbgMaskBackend(model, "local/rmbg")
    mask = backend.predict(image, "ignored")
    assert model.seen_shapes == [(1, 3, 1024, 1024)]
    assert mask.shape == (60, 90) and mask.min() == 0.0 and mask.max() == pytest.approx(1.0)
    truth = np.zeros((60, 90), bool)
    truth[20:40, 30:60] = True
    assert iou(mask, truth) > 0.9
    assert backend.describe()["rmbg_model"] == "local/rmbg"


def test_rmbg_requires_the_remote_code_opt_in():
    from conceptflow.data.masks import get_mask_backend

    with pytest.raises(ModelUnavailableError, match="mask.trust_remote_code: true"):
        get_mask_backend(MaskConfig(backend="rmbg"))


def test_rmbg_unavailable_model_is_a_clear_error(tmp_path):
    from conceptflow.data.masks import get_mask_backend

    opted_in = True
    empty_folder = tmp_path / "rmbg"
    empty_folder.mkdir()
    config = MaskConfig(backend="rmbg", rmbg_model=str(empty_folder), trust_remote_code=opted_in)
    with pytest.raises(ModelUnavailableError, match="mask.rmbg_model = .* could not be loaded"):
        get_mask_backend(config)


# --- backend selection -----------------------------------------------------------------------


def test_auto_uses_saliency_without_grounded_sam_files(tmp_path, caplog):
    from conceptflow.data.masks import get_mask_backend

    assert get_mask_backend(MaskConfig()).name == "saliency"
    assert get_mask_backend(MaskConfig(backend="saliency")).name == "saliency"
    partly = MaskConfig(sam_checkpoint=str(tmp_path / "sam_vit_h_4b8939.pth"))
    assert get_mask_backend(partly).name == "saliency"
    assert "mask.sam_checkpoint" in caplog.text and "file not found" in caplog.text


def test_auto_picks_grounded_sam_when_its_files_exist(tiny_grounded_sam, tmp_path, monkeypatch):
    from conceptflow.data.masks import get_mask_backend
    from conceptflow.data.masks.grounded_sam import GroundedSamMaskBackend

    built = []  # loading itself is tested above; here only which backend and which files
    monkeypatch.setattr(
        GroundedSamMaskBackend, "from_config",
        classmethod(lambda cls, config, device="cpu": built.append(config) or "grounded"),
    )
    # relative paths are taken relative to the catalog folder (root)
    root = tiny_grounded_sam["config"].parent
    config = MaskConfig(
        groundingdino_config=tiny_grounded_sam["config"].name,
        groundingdino_checkpoint=tiny_grounded_sam["detector_checkpoint"].name,
        sam_checkpoint=tiny_grounded_sam["sam_checkpoint"].name,
        sam_model_type=TINY_SAM_TYPE,
    )
    assert get_mask_backend(config).name == "saliency"  # relative to the working directory
    assert get_mask_backend(config, root=root) == "grounded"
    assert built[0].sam_checkpoint == str(tiny_grounded_sam["sam_checkpoint"])
    assert built[0].groundingdino_config == str(tiny_grounded_sam["config"])


def test_explicit_grounded_sam_with_missing_files_is_an_error(tmp_path):
    from conceptflow.data.masks import get_mask_backend

    config = MaskConfig(
        backend="grounded_sam", groundingdino_config="GroundingDINO_SwinT_OGC.py",
        groundingdino_checkpoint="groundingdino_swint_ogc.pth", sam_checkpoint="sam_vit_h.pth",
    )
    with pytest.raises(ModelUnavailableError, match="mask.groundingdino_config = .* not found"):
        get_mask_backend(config, root=tmp_path)
