"""Load a base pipeline or an encoder from a hub id, a local folder or an embedded id.

One code path for all three: ``embedded:<name>`` is first built into a local folder, a local
folder is used as it is, anything else is passed to ``from_pretrained`` as a hub id (which,
with HF_HUB_OFFLINE=1 or no network, must already be in the hub cache).
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import torch

from conceptflow.errors import ModelUnavailableError
from conceptflow.models.embedded import EMBEDDED_PREFIX, embedded_model_path

# from_pretrained builds modules under accelerate's init_empty_weights, which patches torch
# globally: two threads loading at once (Prefect's thread runner) get meta tensors. Serialise.
LOADING_LOCK = threading.RLock()

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_model_source(model_id: str) -> str:
    """The string to hand to ``from_pretrained``: a local folder path, or the hub id."""
    if model_id.startswith(EMBEDDED_PREFIX):
        with LOADING_LOCK:
            return str(embedded_model_path(model_id))
    if Path(model_id).expanduser().exists():
        return str(Path(model_id).expanduser().resolve())
    return model_id


def _unavailable(model_id: str, error: Exception) -> ModelUnavailableError:
    return ModelUnavailableError(
        f"could not load model {model_id!r}: {error}. Give a local folder in diffusers/transformers "
        "format, a hub id that is in the local hub cache, or an embedded id such as embedded:tiny-sd"
    )


def load_base_pipeline(model_id: str, device: str = "cpu", dtype: str = "float32"):
    """A Stable-Diffusion-1.x pipeline (diffusers) from an id or folder, on ``device``."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    source = resolve_model_source(model_id)
    try:
        with LOADING_LOCK:
            pipeline = StableDiffusionPipeline.from_pretrained(
                source, torch_dtype=DTYPES[dtype], safety_checker=None, requires_safety_checker=False
            )
    except (OSError, ValueError, EnvironmentError) as error:
        raise _unavailable(model_id, error) from error
    pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def load_transformers_model(model_id: str, model_class, processor_class, device: str = "cpu"):
    """(model, processor) of a transformers class pair from an id or folder, in eval mode."""
    source = resolve_model_source(model_id)
    try:
        with LOADING_LOCK:
            model = model_class.from_pretrained(source)
            processor = processor_class.from_pretrained(source)
    except (OSError, ValueError, EnvironmentError) as error:
        raise _unavailable(model_id, error) from error
    return model.eval().to(device), processor


FINGERPRINTED_SUFFIXES = {".safetensors", ".json", ".txt", ".bin"}
# folder -> (signature, fingerprint): the last fingerprint of each folder in this process.
_FINGERPRINTS: dict[str, tuple[tuple, str]] = {}
_FINGERPRINTS_LOCK = threading.Lock()


def model_fingerprint(model_id: str) -> str:
    """A content hash of a local model folder's weight files (for lineage); the id for hub models.

    Memoised per process on the files' (path, size, mtime) signature: the pipeline asks for it
    before every train skip check and in fuse and register, and reading the weights again each
    time is what it would cost. A file rewritten with the same size and mtime is not noticed.
    """
    source = Path(resolve_model_source(model_id))
    if not source.is_dir():
        return f"hub:{model_id}"
    files = [path for path in sorted(source.rglob("*")) if path.is_file() and path.suffix in FINGERPRINTED_SUFFIXES]
    signature = tuple((path.relative_to(source).as_posix(), stat.st_size, stat.st_mtime_ns)
                      for path in files for stat in (path.stat(),))
    with _FINGERPRINTS_LOCK:
        known = _FINGERPRINTS.get(str(source))
        if known is not None and known[0] == signature:
            return known[1]
        digest = hashlib.md5()
        for path in files:
            digest.update(path.relative_to(source).as_posix().encode())
            digest.update(path.read_bytes())
        _FINGERPRINTS[str(source)] = (signature, digest.hexdigest())
        return digest.hexdigest()
