"""Class-prior images: what the base model draws for a class word, for prior preservation.

DreamBooth / Custom Diffusion / Textual Localization keep the class word's meaning by also
denoising images the base itself draws for "a photo of a <class word>" (the reference draws 200
per class). They depend only on the base, the prompt, the size, the steps and the seed, so they
are drawn once and cached by those (``.cache/class_images/<key>/``); a killed draw keeps the
images it finished (each written atomically) and the next one draws the rest.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from conceptflow.fileio import atomic_path
from conceptflow.train.common import load_training_images

BATCH = 4


def class_prompt(class_word: str) -> str:
    return f"a photo of a {class_word}"


def class_images_key(base_fingerprint: str, class_word: str, resolution: int, steps: int, seed: int) -> str:
    payload = json.dumps([base_fingerprint, class_prompt(class_word), resolution, steps, seed])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@torch.no_grad()
def class_prior_images(pipeline, class_word: str, count: int, resolution: int, steps: int, seed: int,
                       folder: Path) -> list[Path]:
    """``count`` images the base ``pipeline`` draws for the class word, image i from seed ``seed + i``,
    in ``folder`` (kept: images already there are not drawn again)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{index:04d}.png" for index in range(count)]
    missing = [index for index, path in enumerate(paths) if not path.is_file()]
    if missing:
        from conceptflow.sample.core import SampleRequest
        from conceptflow.sample.fused import sample_images

        requests = [SampleRequest(class_prompt(class_word), seed + index) for index in missing]
        for start in range(0, len(requests), BATCH):  # written as drawn: a killed draw keeps its images
            chunk = requests[start:start + BATCH]
            images = sample_images(pipeline, chunk, (), resolution, steps=steps, batch_size=BATCH,
                                   description=f"class images '{class_word}'")
            for index, image in zip(missing[start:start + BATCH], images):
                with atomic_path(paths[index], suffix=".png") as temporary:
                    image.save(temporary, format="PNG")
    return paths


def prior_pixels(paths_per_class: list[list[Path]], resolution: int) -> torch.Tensor:
    """(C, P, 3, R, R) in [-1, 1]: each class's images (P per class) as training pixels."""
    return torch.stack([load_training_images(paths, None, resolution)[0] for paths in paths_per_class])
