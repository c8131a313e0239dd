"""Textual Localization: the attention loss's equations, what trains, the group catalog form,
given masks, resume = uninterrupted, and group concepts combined with an ED-LoRA concept."""

from __future__ import annotations

import pytest
import torch
import yaml

from conceptflow.config import load_catalog
from conceptflow.errors import CatalogError, DataError
from conceptflow.fileio import file_md5
from conceptflow.layout import Layout
from conceptflow.methods.textual_localization.losses import localization_loss, localization_maps, min_max
from conceptflow.toy.groups import write_toy_group_catalog

PAIR = ("zigzag_star", "eye_heart")
TINY_TRAIN = {"prior_images": 2, "prior_steps": 2, "batch_size": 1}


# --- the attention loss ---------------------------------------------------------------------

def test_hard_loss_is_zero_when_each_map_equals_its_mask_and_the_mse_otherwise():
    masks = torch.zeros(2, 2, 4, 4)
    masks[:, 0, :2] = 1.0
    masks[:, 1, 2:] = 1.0
    assert localization_loss(masks.clone(), masks, "hard") == 0
    maps = masks.clone()
    maps[0, 0, 3, 3] = 0.5  # one pixel of concept 0 in image 0 off by 0.5: (0.25 / 32 pixels) / 2 concepts
    torch.testing.assert_close(localization_loss(maps, masks, "hard"), torch.tensor(0.25 / 32 / 2))


def test_soft_loss_is_blind_inside_the_mask_and_sees_outside():
    masks = torch.zeros(1, 1, 4, 4)
    masks[..., 1:3, 1:3] = 1.0
    maps = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    base = localization_loss(maps, masks, "soft")
    inside = maps.clone()
    inside[..., 1:3, 1:3] = torch.rand(2, 2)
    assert localization_loss(inside, masks, "soft") == base
    outside = maps.clone()
    outside[..., 0, 0] += 0.3
    assert localization_loss(outside, masks, "soft") != base
    expected = ((maps * (1 - masks)) ** 2).mean()  # the reference: MSE x zero area, mean over all pixels
    torch.testing.assert_close(base, expected)


def test_absent_concepts_do_not_count():
    masks = torch.zeros(2, 2, 2, 2)
    masks[:, :, 0, 0] = 1.0
    maps = masks.clone()
    maps[1, 1] = 1.0  # wrong map, but concept 1 is absent from prompt 1
    present = torch.tensor([[True, False], [True, False]])
    assert localization_loss(maps, masks, "hard", present) == 0
    assert localization_loss(maps, masks, "hard") > 0


def test_maps_are_upsampled_normalised_per_resolution_and_averaged():
    # a 2x2 layer and two 4x4 layers; concept maps min-max normalised after upsampling to 4x4
    small = torch.tensor([[[0.1], [0.3], [0.2], [0.4]]])  # (B=1, Q=4, C=1)
    big_a = torch.arange(16.0).view(1, 16, 1)
    big_b = 2 * big_a
    maps = localization_maps({"s": small, "a": big_a, "b": big_b}, sides=(2, 4), size=4)
    upsampled = torch.nn.functional.interpolate(small.transpose(1, 2).reshape(1, 1, 2, 2), size=(4, 4),
                                                mode="bilinear", align_corners=False)
    expected = (min_max(upsampled) + min_max(1.5 * big_a.transpose(1, 2).reshape(1, 1, 4, 4))) / 2
    torch.testing.assert_close(maps, expected)
    only_big = localization_maps({"s": small, "a": big_a}, sides=(4,), size=4)
    torch.testing.assert_close(only_big, min_max(big_a.transpose(1, 2).reshape(1, 1, 4, 4)))
    with pytest.raises(ValueError, match="attention_scales"):
        localization_maps({"s": small}, sides=(8,), size=4)


# --- the catalog's group form ------------------------------------------------------------------

def _write(tmp_path, raw):
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_group_concepts_take_the_groups_photos_masks_and_settings(tmp_path):
    catalog = load_catalog(write_toy_group_catalog(tmp_path, {"pair": PAIR}, photos_per_group=2, train=TINY_TRAIN))
    for name in PAIR:
        concept = catalog.concept(name)
        assert concept.group == "pair" and concept.train.method == "textual_localization"
        assert catalog.images_dir(concept) == tmp_path / "groups" / "pair"
        assert concept.masks.as_posix() == f"groups/pair_masks/{name}"
    assert catalog.trained_with(PAIR[1]) == PAIR


@pytest.mark.parametrize("change, message", [
    (lambda raw: raw["concepts"]["zigzag_star"].update(images="elsewhere"), r"concepts\.zigzag_star\.images"),
    (lambda raw: raw["groups"]["pair"]["concepts"].append("nobody"), r"'nobody' is not in concepts"),
    (lambda raw: [entry.update(train={"method": "edlora"}) for entry in (raw["groups"]["pair"],
                                                                          *raw["concepts"].values())],
     r"learns one concept from its own photos"),
    (lambda raw: raw["concepts"]["eye_heart"]["train"].update(steps=7), r"concepts\.eye_heart\.train: .* differs"),
    (lambda raw: raw["concepts"].update(lone={"class_word": "star", "images": "groups/pair",
                                              "train": {"method": "textual_localization"}}),
     r"concepts\.lone\.train\.method 'textual_localization' learns concepts from photos showing them together"),
    (lambda raw: raw["groups"].update(zigzag_star={"images": "groups/pair", "concepts": ["eye_heart", "x"]}),
     r"already in group|share a name|not in concepts"),
])
def test_bad_group_entries_are_refused_naming_the_field(tmp_path, change, message):
    raw = yaml.safe_load(write_toy_group_catalog(tmp_path, {"pair": PAIR}, photos_per_group=2).read_text())
    change(raw)
    with pytest.raises(CatalogError, match=message):
        load_catalog(_write(tmp_path, raw))


def test_ground_truth_masks_follow_their_photos_and_a_missing_one_is_named(tmp_path, one_torch_thread):
    from PIL import Image

    from conceptflow.stages.ingest import ingest
    from conceptflow.stages.mask import mask

    catalog = load_catalog(write_toy_group_catalog(tmp_path, {"pair": PAIR}, photos_per_group=3))
    layout = Layout(catalog)
    for name in PAIR:
        ingest(catalog, name)
        mask(catalog, name)
    import json

    for name in PAIR:
        for record in json.loads((layout.images(name) / "ingest.json").read_text())["images"]:
            source = tmp_path / "groups" / "pair_masks" / name / f"{record['source'].rsplit('/', 1)[1][:-4]}.png"
            given = Image.open(source).convert("L")
            written = Image.open(layout.masks(name) / record["output"])
            assert list(given.getdata()) == list(written.getdata())
    # the two concepts' masks differ (the saliency fallback could not separate them)
    first = layout.masks(PAIR[0]) / "000.png"
    assert list(Image.open(first).getdata()) != list(Image.open(layout.masks(PAIR[1]) / "000.png").getdata())
    (tmp_path / "groups" / "pair_masks" / PAIR[0] / "01.png").unlink()
    with pytest.raises(DataError, match=r"no mask for photo 01\.png in .*pair_masks/zigzag_star"):
        mask(load_catalog(tmp_path / "catalog.yaml"), PAIR[0])


# --- training ------------------------------------------------------------------------------------

def test_gradients_reach_the_tokens_and_cross_attention_kv_only(tmp_path, one_torch_thread):
    from conceptflow.methods import get_method
    from conceptflow.methods.textual_localization.group_setup import GroupMember, prepare_group_training
    from conceptflow.models.loading import load_base_pipeline
    from conceptflow.stages.ingest import ingest
    from conceptflow.stages.mask import mask
    from conceptflow.data.ingest import ingested_captions, ingested_images

    catalog = load_catalog(write_toy_group_catalog(tmp_path, {"pair": PAIR}, photos_per_group=2,
                                                   train={"prior_images": 0}))
    layout = Layout(catalog)
    for name in PAIR:
        ingest(catalog, name)
        mask(catalog, name)
    pipeline = load_base_pipeline("embedded:tiny-sd")
    images = ingested_images(layout.images(PAIR[0]))
    members = [GroupMember(n, catalog.concept(n).class_word, tuple(layout.masks(n) / p.name for p in images))
               for n in PAIR]
    setup = prepare_group_training(pipeline, "pair", members, images, ingested_captions(images), 64, 32, 0)
    config = catalog.group("pair").train
    method = get_method("textual_localization").build_trainer(setup, config)
    loss, logs = method.loss(0, torch.Generator().manual_seed(0))
    loss.backward()
    assert logs["loss_attention"] > 0
    assert setup.embeddings.weight.grad is not None and setup.embeddings.weight.grad.abs().sum() > 0
    trained = {id(linear.weight) for linear in method.kv.values()}
    assert all(method.kv[path].weight.grad.abs().sum() > 0 for path in method.kv)
    for model in (pipeline.unet, pipeline.text_encoder, pipeline.vae):
        for name, parameter in model.named_parameters():
            if id(parameter) not in trained:
                assert parameter.grad is None, name
    assert all(".attn2." in path and path.endswith((".to_k", ".to_v")) for path in method.kv)
    # token positions come from each prompt: the second concept named first moves its tokens
    positions, present = method._prompt_positions(["a <eye_heart> and a <zigzag_star>", "a photo of a <zigzag_star>"])
    assert positions[0, 2] < positions[0, 0] and present.tolist() == [[True, True], [True, False]]


def test_a_killed_group_training_resumes_to_the_uninterrupted_result(tmp_path, one_torch_thread):
    from conceptflow.stages.ingest import ingest
    from conceptflow.stages.mask import mask
    from conceptflow.stages.train import train

    def project(folder):
        catalog = load_catalog(write_toy_group_catalog(folder, {"pair": PAIR}, photos_per_group=2, train_steps=4,
                                                       train={**TINY_TRAIN, "checkpoint_every": 2}))
        for name in PAIR:
            ingest(catalog, name)
            mask(catalog, name)
        return catalog

    whole = project(tmp_path / "whole")
    for name in PAIR:
        train(whole, name)
    killed = project(tmp_path / "killed")
    with pytest.raises(InterruptedError):
        train(killed, PAIR[0], stop_after=2)
    assert any(Layout(killed).checkpoints("pair").iterdir())
    for name in PAIR:
        manifest, ran = train(killed, name)
        assert ran
    for name in PAIR:
        assert (file_md5(Layout(killed).adapter(name) / "adapter.safetensors")
                == file_md5(Layout(whole).adapter(name) / "adapter.safetensors"))
    # one joint run: the two concepts hold the same K/V update and their own tokens
    from conceptflow.adapters.concept_io import read_adapter

    first, second = (read_adapter(Layout(whole).adapter(name))[0] for name in PAIR)
    shared = sorted(key for key in first if key.startswith("unet."))
    assert shared and shared == sorted(key for key in second if key.startswith("unet."))
    assert all(torch.equal(first[key], second[key]) for key in shared)
    assert not {k for k in first if k.startswith("embedding.")} & {k for k in second if k.startswith("embedding.")}
    # nothing changed: nothing retrains; one member's masks changed: the other member retrains too
    assert not train(whole, PAIR[1])[1]
    from PIL import Image

    changed = whole.root / "groups" / "pair_masks" / PAIR[1] / "00.png"
    Image.new("L", Image.open(changed).size, 255).save(changed)
    mask(whole, PAIR[1])
    assert train(whole, PAIR[0])[1]


def test_group_concepts_combine_with_concepts_of_every_other_kind_in_one_image(tmp_path, one_torch_thread):
    from conceptflow.stages.chain import make_combination

    singles = {"flag_circle": "edlora", "target_star": "tova", "cross_emblem": "cones2"}
    path = write_toy_group_catalog(tmp_path, {"pair": PAIR}, photos_per_group=2, train_steps=2, train=TINY_TRAIN,
                                   single_concepts=list(singles), combinations={"five": (*PAIR, *singles)},
                                   prompt_seeds=(0,))
    raw = yaml.safe_load(path.read_text())
    for name, method in singles.items():
        raw["concepts"][name]["train"] = {"method": method, "steps": 2, "checkpoint_every": 2}
    raw["generate"] = {"sampler": "fused", "steps": 2}
    catalog = load_catalog(_write(tmp_path, raw))
    generated = make_combination(catalog, "five")
    assert sorted(p.name for p in generated.glob("*.png"))
    import json

    methods = {json.loads((Layout(catalog).adapter(n) / "concept.json").read_text())["method"]
               for n in (*PAIR, *singles)}
    assert methods == {"textual_localization", "edlora", "tova", "cones2"}


def test_the_flow_plan_trains_a_group_after_every_members_masks(tmp_path):
    from conceptflow.stages.table import plan, stage, upstream_items

    catalog = load_catalog(write_toy_group_catalog(tmp_path, {"pair": PAIR}, photos_per_group=2,
                                                   combinations={"alone": (PAIR[1],)}))
    jobs = [(row.name, item) for row, item in plan(catalog)]
    first_train = jobs.index(("train", PAIR[0]))
    assert {("mask", PAIR[0]), ("mask", PAIR[1])} <= set(jobs[:first_train])
    # a combination of one member still runs its group-mate's stages (the training reads its masks)
    limited = [(row.name, item) for row, item in plan(catalog, combinations=("alone",))]
    assert ("mask", PAIR[0]) in limited and limited.index(("mask", PAIR[0])) < limited.index(("train", PAIR[1]))
    assert upstream_items(catalog, stage("train"), stage("mask"), PAIR[1]) == PAIR
    assert upstream_items(catalog, stage("mask"), stage("ingest"), PAIR[1]) == (PAIR[1],)
