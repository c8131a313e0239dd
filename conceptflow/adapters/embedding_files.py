"""A concept's tokens as a textual-inversion embedding file (A1111, ComfyUI, diffusers).

File layout: a safetensors file holding one tensor, ``emb_params``, of shape (vectors, dim) (the
form kohya's and A1111's trainers save). The three loaders read it as follows:

* AUTOMATIC1111 (``modules/textual_inversion/textual_inversion.py``, ``create_embedding_from_data``:
  a dict with a single tensor) names the embedding after the file: ``zigzag_star.safetensors`` in
  ``embeddings/`` is used by writing ``zigzag_star`` in a prompt, all vectors in a row;
* ComfyUI (``comfy/sd1_clip.py``, ``load_embed``: the ``emb_params`` key) by
  ``embedding:zigzag_star`` in a prompt;
* diffusers ``pipe.load_textual_inversion(file, token="<zigzag_star>")`` (a one-key dict) adds the
  tokens ``<zigzag_star>``, ``<zigzag_star>_1`` (one per vector) and expands ``<zigzag_star>`` in
  prompts to all of them (``maybe_convert_prompt``). Without ``token=`` the token would be
  ``emb_params``.

A concept here has two tokens with one embedding per cross-attention layer (``<name1_lNN>``,
``<name2_lNN>``, ``conceptflow.adapters.tokens``); these files have one embedding per token,
shared by every layer, so a concept is written as the (2, dim) single-embedding form chosen by
``single_embedding``:

* ``mean``: the mean over layers of each token's embeddings, the least-squares single vector in
  embedding space (it minimises Σ_l ‖e − e_l‖²);
* ``middle``: the embedding of the middle cross-attention layer (index n_layers // 2 in the
  down → mid → up order), one embedding the concept's LoRA was actually trained with.

The default, ``DEFAULT_FORM``, is ``middle``. Measured by ``benchmarks/single_embedding.py`` (toy base,
zigzag_star after 100 ED-LoRA steps, 32 paired images per arm; toy identity, 95% bootstrap
interval): native layer-wise 0.132 [0.027, 0.240]; exported in plain diffusers, ``middle`` 0.021
[-0.090, 0.141] (paired cost -0.111 [-0.232, 0.007]), ``mean`` -0.055 [-0.152, 0.046] (cost -0.187
[-0.339, -0.028]); the base prompted with the class word -0.037 [-0.122, 0.049]. The mean loses more:
part 1 of each layer starts from its own random vector, so averaging ten of them shrinks what is
not shared toward zero, while the middle layer's pair is one the LoRA was trained against. Either
way most of the concept's identity is in the layer-wise tokens, not in these files.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file

from conceptflow.adapters.concept_io import EMBEDDING_PREFIX, read_adapter, safetensors_bytes, split_prefix
from conceptflow.errors import ConceptflowError
from conceptflow.fileio import atomic_path

EMBEDDING_KEY = "emb_params"
SINGLE_FORMS = ("mean", "middle")
DEFAULT_FORM = "middle"


def layerwise_embeddings(embeddings: Mapping[str, torch.Tensor], concept_name: str) -> torch.Tensor:
    """A concept's rows ``<name1_lNN>`` / ``<name2_lNN>`` as a (n_layers, 2, dim) tensor."""
    pattern = re.compile(rf"<{re.escape(concept_name)}([12])_l(\d+)>")
    found: dict[tuple[int, int], torch.Tensor] = {}
    for token, row in embeddings.items():
        match = pattern.fullmatch(token)
        if match:
            found[(int(match.group(2)), int(match.group(1)))] = row
    n_layers = 1 + max((layer for layer, _ in found), default=-1)
    missing = [(layer, part) for layer in range(n_layers) for part in (1, 2) if (layer, part) not in found]
    if n_layers == 0 or missing:
        raise ConceptflowError(
            f"no complete layer-wise tokens <{concept_name}1_lNN>/<{concept_name}2_lNN> among "
            f"{sorted(embeddings)[:4]}...; missing (layer, part) {missing[:3]}")
    return torch.stack([torch.stack([found[(layer, 1)], found[(layer, 2)]]) for layer in range(n_layers)]).float()


def single_embedding(layerwise: torch.Tensor, form: str = DEFAULT_FORM) -> torch.Tensor:
    """(n_layers, tokens, dim) → (tokens, dim): one embedding per token for every layer."""
    if form == "mean":
        return layerwise.mean(dim=0)
    if form == "middle":
        return layerwise[layerwise.shape[0] // 2].clone()
    raise ConceptflowError(f"unknown single-embedding form {form!r}; known: {list(SINGLE_FORMS)}")


def concept_vectors(embeddings: Mapping[str, torch.Tensor], concept_name: str, form: str = DEFAULT_FORM) -> torch.Tensor:
    """The (2, dim) single-embedding form of a concept's layer-wise rows."""
    return single_embedding(layerwise_embeddings(embeddings, concept_name), form)


def multi_vector_tokens(token: str, count: int) -> list[str]:
    """diffusers' names of a multi-vector embedding's tokens: ``<c>``, ``<c>_1``, ``<c>_2`` ..."""
    return [token] + [f"{token}_{i}" for i in range(1, count)]


def write_embedding_file(path: str | Path, vectors: torch.Tensor, metadata: Mapping[str, str] | None = None) -> Path:
    """Write (vectors, dim) as ``{"emb_params": vectors}`` safetensors; returns the path."""
    path = Path(path)
    if vectors.dim() != 2:
        raise ValueError(f"an embedding file holds (vectors, dim); got shape {tuple(vectors.shape)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        temporary.write_bytes(safetensors_bytes({EMBEDDING_KEY: vectors.detach().float().contiguous()},
                                                {str(k): str(v) for k, v in (metadata or {}).items()}))
    return path


def read_embedding_file(path: str | Path) -> torch.Tensor:
    """The (vectors, dim) tensor of an embedding file written by ``write_embedding_file``."""
    tensors = load_file(str(path))
    if set(tensors) != {EMBEDDING_KEY}:
        raise ConceptflowError(f"{path} holds {sorted(tensors)}, not a single {EMBEDDING_KEY!r} embedding")
    return tensors[EMBEDDING_KEY]


def export_concept_embedding(concept_folder: Path, out_path: Path, form: str = DEFAULT_FORM) -> Path:
    """A trained concept folder's tokens as an embedding file at ``out_path``.

    Name the file after the concept (``<name>.safetensors``): A1111 and ComfyUI call the
    embedding by its file name.
    """
    tensors, meta = read_adapter(Path(concept_folder))
    name = str(meta.get("name", ""))
    vectors = concept_vectors(split_prefix(tensors, EMBEDDING_PREFIX), name, form)
    return write_embedding_file(out_path, vectors, {"conceptflow_concept": name, "conceptflow_form": form,
                                                     "diffusers_token": f"<{name}>"})
