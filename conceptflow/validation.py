"""Checks of a loaded catalog that need the disk, torch or the base model's tokenizer, before any stage runs.

``load_catalog`` checks what the YAML alone decides (names, seeds, references, duplicate keys).
``validate_catalog`` checks the rest, so that a run fails in one message before ingest starts
instead of inside a task after ingest and masking ran. ``conceptflow validate``, ``conceptflow
run`` (and the catalog flow itself) and ``schedule`` call it, as do the stage commands ``mask``,
``train``, ``fuse``, ``generate`` and ``evaluate`` (``ingest`` needs none of it and loads only). Every problem is one line naming the catalog field, what is
wrong and the fix; all of them are raised together as one ``CatalogError``.

What is checked:
- ``base_model``: an ``embedded:`` id must name a known embedded model; a local path (one that
  exists beside the catalog, or starts with ``/``, ``./``, ``../``, ``~``, or has more than one
  ``/``) must be a diffusers pipeline folder (``model_index.json``); anything else must be hub
  id syntax (``org/name``). Hub ids are NOT checked for existence (that needs the network or
  the hub cache; a missing one fails when the train stage loads it). The same rules apply to
  ``evaluate.clip_model`` / ``dino_model`` (a local folder needs ``config.json``).
- ``device``: parsed by ``torch.device``; ``cuda[:N]`` needs ``torch.cuda.is_available()`` and
  N below the GPU count, ``mps`` needs the MPS backend; other device types are refused.
- prompts: counted with the base's own tokenizer (the real CLIP BPE for embedded bases, the
  folder's ``tokenizer/`` for a local base, the hub cache for a hub id, skipped when it is not
  there), each ``<name>`` counted as the 2 tokens ED-LoRA writes it as, and also with each
  ``<name>`` replaced by its class word (the base-model and CLIP-T form): a prompt past the
  text encoder's length (77 with start and end tokens) is refused, naming the count and the
  word where it would be cut. Training captions beside the photos (``*.txt``) are counted the
  same way (concept-token form).
- ``evaluate.toy_evaluators``: the folder, with its ``recogniser/`` and ``identity/``.
- each concept's ``images`` folder exists; every stage output path lands in ``data/`` (``Layout``).
"""

from __future__ import annotations

import functools
import re
import tempfile
from pathlib import Path
from typing import Callable

from conceptflow.config import Catalog, format_problems
from conceptflow.errors import CatalogError, ConceptflowError
from conceptflow.layout import Layout
from conceptflow.schema import CONCEPT_REFERENCE

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
TOKENS_PER_CONCEPT = 2  # ED-LoRA writes <name> as <name1> <name2> (conceptflow.adapters.tokens)


def validate_catalog(catalog: Catalog, source: str | Path) -> None:
    """Raise one ``CatalogError`` listing every problem of ``catalog`` (read from ``source``), or return."""
    problems = catalog_problems(catalog)
    if problems:
        raise CatalogError(format_problems(Path(source), problems))


def catalog_problems(catalog: Catalog) -> list[str]:
    """Every problem as ``field: what is wrong and the fix``; empty when the catalog can run."""
    problems = model_id_problems(catalog, "base_model", catalog.base_model, "model_index.json", "a diffusers "
                                 "pipeline folder (save_pretrained of a StableDiffusionPipeline)")
    for field in ("clip_model", "dino_model"):
        problems += model_id_problems(catalog, f"evaluate.{field}", getattr(catalog.evaluate, field), "config.json",
                                      "a transformers model folder")
    problems += device_problems(catalog.device)
    problems += folder_problems(catalog)
    if not problems:  # a tokenizer is only worth loading for a base that is there
        problems += prompt_problems(catalog)
    return problems


def _is_local_path(catalog: Catalog, value: str) -> bool:
    return (value.startswith(("/", "./", "../", "~", ".\\")) or "\\" in value or value.count("/") > 1
            or (catalog.root / value).exists())


def _local_folder(catalog: Catalog, value: str) -> Path:
    """Where a local model path points: ``~`` expanded, relative paths from the catalog's folder."""
    return Path(value).expanduser() if value.startswith("~") else catalog.root / value


def model_id_problems(catalog: Catalog, field: str, value: str, marker: str, kind: str) -> list[str]:
    from conceptflow.models.embedded import EMBEDDED_BUILDERS, EMBEDDED_PREFIX

    if value.startswith(EMBEDDED_PREFIX):
        if value.removeprefix(EMBEDDED_PREFIX) not in EMBEDDED_BUILDERS:
            known = ", ".join(EMBEDDED_PREFIX + name for name in EMBEDDED_BUILDERS)
            return [f"{field}: {value!r} is not an embedded model; known: {known}"]
        return []
    if _is_local_path(catalog, value):
        folder = _local_folder(catalog, value)
        if not folder.exists():
            return [f"{field}: the folder {value!r} ({folder}) does not exist: fix the path (relative to the catalog) "
                    "or give a hub id (org/name) or embedded:tiny-sd"]
        if not (folder / marker).is_file():
            return [f"{field}: {folder} is not {kind} (no {marker}): point it at the folder that holds {marker}"]
        return []
    if not HUB_ID.match(value):
        return [f"{field}: {value!r} is neither a folder beside the catalog nor a hub id (org/name): fix it"]
    return []  # a hub id: not checked offline (it must be in the hub cache when the stage loads it)


def device_problems(device: str) -> list[str]:
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        return [f"device: {device!r} is not a torch device string: use cpu, cuda, cuda:N or mps"]
    if parsed.type == "cpu":
        return []
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            return [f"device: {device!r} but torch sees no CUDA GPU here (torch.cuda.is_available() is False): "
                    "use device: cpu, or run on a machine with a GPU and a CUDA build of torch"]
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            return [f"device: {device!r} but this machine has {torch.cuda.device_count()} GPU(s): use cuda:0 .. "
                    f"cuda:{torch.cuda.device_count() - 1}"]
        return []
    if parsed.type == "mps":
        available = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
        return [] if available else [f"device: {device!r} but the MPS backend is not available here: use cpu"]
    return [f"device: {device!r} is a {parsed.type} device, which conceptflow does not run on: use cpu, cuda, "
            "cuda:N or mps"]


def folder_problems(catalog: Catalog) -> list[str]:
    problems = []
    for concept in catalog.concepts:
        if not catalog.images_dir(concept).is_dir():
            problems.append(f"concepts.{concept.name}.images: the folder {catalog.images_dir(concept)} does not "
                            "exist: fix the path (relative to the catalog)")
    evaluators = catalog.evaluate.toy_evaluators
    if evaluators:
        folder = catalog.root / evaluators
        missing = [part for part in ("recogniser", "identity") if not (folder / part).is_dir()]
        if not folder.is_dir():
            problems.append(f"evaluate.toy_evaluators: the folder {folder} does not exist: fix the path (relative "
                            "to the catalog; `conceptflow pretrain-toy` writes one) or remove the setting")
        elif missing:
            problems.append(f"evaluate.toy_evaluators: {folder} has no {' or '.join(m + '/' for m in missing)}: "
                            "point it at the folder `conceptflow pretrain-toy` wrote")
    layout = Layout(catalog)
    for method, names in ((layout.images, [c.name for c in catalog.concepts]),
                          (layout.fused, [c.name for c in catalog.combinations])):
        for name in names:
            try:
                method(name)
            except CatalogError as error:
                problems.append(str(error))
    return problems


def _load_tokenizer(catalog: Catalog):
    """The base model's tokenizer, or None when it cannot be had cheaply (a hub id not in the cache)."""
    from conceptflow.models.embedded import EMBEDDED_PREFIX, cache_root

    value = catalog.base_model
    try:
        if value.startswith(EMBEDDED_PREFIX):  # every embedded base uses the real CLIP BPE (models/tokenizer.py)
            built = sorted(cache_root().glob(f"{value.removeprefix(EMBEDDED_PREFIX)}-v*/tokenizer"))
            return _tokenizer_from(str(built[-1]) if built else None, None)
        if _is_local_path(catalog, value):
            return _tokenizer_from(str(_local_folder(catalog, value) / "tokenizer"), None)
        return _tokenizer_from(value, "tokenizer")
    except (OSError, ValueError, ConceptflowError):
        return None


def _files_stamp(folder: str) -> tuple:
    path = Path(folder)
    return tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir())) if path.is_dir() else ()


def _tokenizer_from(source: str | None, subfolder: str | None):
    """A CLIPTokenizer from a folder or a cached hub id (None: the real CLIP BPE built afresh), loaded
    once per process and file state (building the BPE tables takes ~1.5 s; a run validates twice)."""
    return _cached_tokenizer(source, subfolder, _files_stamp(source) if source and subfolder is None else ())


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(source: str | None, subfolder: str | None, stamp: tuple):
    from transformers import CLIPTokenizer

    if source is None:
        from conceptflow.models.tokenizer import build_clip_tokenizer

        with tempfile.TemporaryDirectory() as folder:
            return build_clip_tokenizer(Path(folder))
    if subfolder is None:
        return CLIPTokenizer.from_pretrained(source)
    return CLIPTokenizer.from_pretrained(source, subfolder=subfolder, local_files_only=True)


def prompt_problems(catalog: Catalog, tokenizer=None) -> list[str]:
    """Prompts and training captions longer than the text encoder takes (``tokenizer``: the base's)."""
    tokenizer = tokenizer or _load_tokenizer(catalog)
    if tokenizer is None:
        return []
    limit = tokenizer.model_max_length - 2  # start and end tokens
    class_words = {concept.name: concept.class_word for concept in catalog.concepts}
    concept_tokens = f"each <name> as its {TOKENS_PER_CONCEPT} concept tokens"
    forms: dict[str, Callable[[str], str]] = {
        concept_tokens: lambda text: CONCEPT_REFERENCE.sub(" " + " ".join(["x"] * TOKENS_PER_CONCEPT) + " ", text),
        "each <name> as its class word": lambda text: CONCEPT_REFERENCE.sub(
            lambda m: class_words.get(m.group(1), m.group(1)), text),
    }

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])

    def too_long(where: str, text: str, form_names: tuple[str, ...], fix: str) -> list[str]:
        for form in form_names:
            rewrite = forms[form]
            tokens = count(rewrite(text))
            if tokens <= limit:
                continue
            words = text.split()
            kept = next((i for i in range(len(words)) if count(rewrite(" ".join(words[: i + 1]))) > limit),
                        len(words) - 1)
            return [f"{where}: {text[:60]!r}{'...' if len(text) > 60 else ''} is {tokens} tokens ({form}); the text "
                    f"encoder takes {limit} ({limit + 2} with start and end) and would cut it before {words[kept]!r} "
                    f"(word {kept + 1}): {fix}"]
        return []

    problems = []
    for combination in catalog.combinations:
        for index, prompt in enumerate(combination.prompts):
            problems += too_long(f"combinations.{combination.name}.prompts.{index}", prompt, tuple(forms),
                                 "shorten the prompt")
    for concept in catalog.concepts:  # training captions beside the photos (conceptflow.data.ingest)
        folder = catalog.images_dir(concept)
        for caption in sorted(folder.glob("*")) if folder.is_dir() else ():
            if caption.suffix.lower() != ".txt" or not caption.is_file():
                continue
            try:
                text = " ".join(caption.read_text(encoding="utf-8").split())
            except (OSError, UnicodeError):
                continue  # ingest names it
            problems += too_long(f"concepts.{concept.name}.images: caption {caption}", text, (concept_tokens,),
                                 "shorten the caption")
    return problems
