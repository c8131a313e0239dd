"""Foreground masks for concept images, behind one backend interface.

``get_mask_backend(config.mask)`` picks the backend the catalog asks for:

* ``saliency``: no weights (boundary-prior saliency + GrabCut), always available;
* ``grounded_sam``: GroundingDINO box for the class word → SAM mask, from the official files;
* ``rmbg``: BRIA RMBG-1.4, only with ``mask.trust_remote_code: true``;
* ``auto`` (default): ``grounded_sam`` when its three files are configured and exist, else
  ``saliency``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from conceptflow.data.masks.base import MaskBackend
from conceptflow.data.masks.saliency import SaliencyMaskBackend

logger = logging.getLogger(__name__)

__all__ = [
    "MaskBackend",
    "SaliencyMaskBackend",
    "get_mask_backend",
    "grounded_sam_files_present",
    "resolve_mask_paths",
]


GROUNDED_SAM_FIELDS = ("groundingdino_config", "groundingdino_checkpoint", "sam_checkpoint")


def grounded_sam_files_present(config) -> bool:
    """True when the GroundingDINO config/checkpoint and the SAM checkpoint all exist.

    Logs a warning for a configured path whose file is missing, since ``auto`` then quietly
    uses the saliency backend.
    """
    configured = {field: getattr(config, field) for field in GROUNDED_SAM_FIELDS}
    configured = {field: path for field, path in configured.items() if path}
    missing = [field for field, path in configured.items() if not Path(path).expanduser().is_file()]
    for field in missing:
        logger.warning("mask.%s = %r: file not found", field, configured[field])
    return len(configured) == len(GROUNDED_SAM_FIELDS) and not missing


def resolve_mask_paths(config, root: str | Path):
    """``config`` with relative grounded_sam file paths taken relative to ``root``
    (the catalog's folder)."""
    updates = {
        field: str(Path(root) / Path(path).expanduser())
        for field in GROUNDED_SAM_FIELDS
        if (path := getattr(config, field)) and not Path(path).expanduser().is_absolute()
    }
    return config.model_copy(update=updates) if updates else config


def get_mask_backend(config, device: str = "cpu", root: str | Path | None = None) -> MaskBackend:
    """The mask backend a ``MaskConfig`` selects (models loaded on ``device``; relative file
    paths are taken relative to ``root`` when given)."""
    if root is not None:
        config = resolve_mask_paths(config, root)
    backend = config.backend
    if backend == "auto":
        backend = "grounded_sam" if grounded_sam_files_present(config) else "saliency"
        logger.info("mask.backend auto -> %s", backend)
    if backend == "saliency":
        return SaliencyMaskBackend()
    if backend == "grounded_sam":
        from conceptflow.data.masks.grounded_sam import GroundedSamMaskBackend

        return GroundedSamMaskBackend.from_config(config, device=device)
    if backend == "rmbg":
        from conceptflow.data.masks.rmbg import RmbgMaskBackend

        return RmbgMaskBackend.from_config(config, device=device)
    raise ValueError(f"unknown mask backend {backend!r}")  # MaskConfig's Literal prevents this
