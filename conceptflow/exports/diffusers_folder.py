"""A fused combination as a full diffusers pipeline folder that plain diffusers loads.

``export_fused_pipeline(fused_folder, out_dir, base_model)`` loads the base the combination was
fused on (its fingerprint must match the one ``concept.json`` recorded), writes the fused full
weights (``weight.unet.<path>``, ``weight.text_encoder.<path>``) into it and adds each concept's
tokens to its tokenizer and text-encoder table, then ``save_pretrained``s the pipeline. Folder:

    model_index.json, unet/, text_encoder/, tokenizer/, vae/, scheduler/   (diffusers)
    conceptflow_export.json   what was exported: combination, concepts, their tokens, the form

Tokens: each concept ``<name>`` becomes the two added tokens ``<name>``, ``<name>_1`` holding its
single-embedding form (``conceptflow.adapters.embedding_files``: a diffusers multi-vector textual
inversion as ``load_textual_inversion`` would add it), so that
``StableDiffusionPipeline.from_pretrained(out_dir)`` draws the concepts from prompts written as in
the catalog, ``a <name> ...``: the pipeline's ``maybe_convert_prompt`` expands ``<name>`` to
``<name> <name>_1`` because both are added tokens. The layer-wise tokens are not written (plain
diffusers gives every cross-attention layer the same text). The scheduler is DPM-Solver++, the one
conceptflow samples with. No safety checker, as the base is loaded by conceptflow.
"""

from __future__ import annotations

import json
from pathlib import Path

from conceptflow.adapters.concept_io import CONCEPT_FILE, EMBEDDING_PREFIX, WEIGHT_PREFIX, read_adapter, set_weights, split_prefix
from conceptflow.adapters.embedding_files import DEFAULT_FORM, concept_vectors, multi_vector_tokens
from conceptflow.adapters.tokens import write_embeddings
from conceptflow.errors import ConceptflowError
from conceptflow.fileio import atomic_directory
from conceptflow.models.loading import load_base_pipeline, model_fingerprint

EXPORT_FILE = "conceptflow_export.json"


def fused_pipeline(fused_folder: Path, base_model: str, form: str = DEFAULT_FORM):
    """(the base pipeline with the fused weights and single-form concept tokens written in, the
    token list per concept)."""
    if not (Path(fused_folder) / CONCEPT_FILE).is_file():
        raise ConceptflowError(f"{fused_folder} holds no fused model ({CONCEPT_FILE} missing); "
                               "run `conceptflow fuse` for the combination first")
    tensors, meta = read_adapter(Path(fused_folder))
    if meta.get("kind") != "fused":
        raise ConceptflowError(f"{fused_folder} is not a fused combination (concept.json kind "
                               f"{meta.get('kind')!r}); run `conceptflow fuse` for it")
    runtime = [part["name"] for part in meta.get("runtime_parts", [])]
    if runtime:  # a token-position update or a text residual has no place in plain diffusers weights
        raise ConceptflowError(
            f"{fused_folder}: concepts {runtime} act only at run time (ToVA token-position updates, Cones 2 text "
            "residuals), which a diffusers folder cannot hold; export the combination without them, or generate "
            "and sample it with conceptflow (`conceptflow generate`, or `conceptflow sample` from the registry)")
    recorded, actual = meta.get("base_model_hash"), model_fingerprint(base_model)
    if recorded != actual:
        raise ConceptflowError(f"{fused_folder} was fused on base {meta.get('base_model')!r} (fingerprint "
                               f"{recorded}), but {base_model!r} has fingerprint {actual}; export with the "
                               "catalog it was fused with, or fuse again")
    pipeline = load_base_pipeline(base_model)
    set_weights(pipeline, split_prefix(tensors, WEIGHT_PREFIX))
    embeddings = split_prefix(tensors, EMBEDDING_PREFIX)
    tokens = {}
    for name in meta["concepts"]:
        vectors = concept_vectors(embeddings, name, form)
        tokens[name] = multi_vector_tokens(f"<{name}>", vectors.shape[0])
        write_embeddings(pipeline.tokenizer, pipeline.text_encoder, dict(zip(tokens[name], vectors)))
    return pipeline, tokens, meta


def export_fused_pipeline(fused_folder: Path, out_dir: Path, base_model: str, form: str = DEFAULT_FORM) -> Path:
    """Write the fused combination at ``fused_folder`` as a diffusers folder ``out_dir``.

    ``out_dir`` may be a previous export (it is replaced) or must not exist / be empty.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / EXPORT_FILE).is_file():
        raise ConceptflowError(f"{out_dir} exists and is not a conceptflow export; choose a new --out folder")
    pipeline, tokens, meta = fused_pipeline(fused_folder, base_model, form)
    with atomic_directory(out_dir) as staging:
        pipeline.save_pretrained(str(staging), safe_serialization=True)
        record = {"kind": "fused_pipeline", "combination": meta.get("name"), "base_model": meta.get("base_model"),
                  "fuse_method": meta.get("method"), "single_embedding_form": form,
                  "concepts": {name: {"tokens": tokens[name], "class_word": info.get("class_word"),
                                      "method": info.get("method")}
                               for name, info in meta["concepts"].items()}}
        (staging / EXPORT_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return out_dir
