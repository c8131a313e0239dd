"""Layer-wise concept tokens (ED-LoRA, Mix-of-Show §3).

A concept ``<dog>`` is written as two new tokens ``<dog1> <dog2>``; each of them has one
embedding per UNet cross-attention layer, so the tokenizer gets ``<dog1_l00>`` ...
``<dog2_lNN>``. A prompt is encoded once per layer (all variants in one batched text-encoder
call) into a (batch, layers, tokens, dim) tensor that the attention processor slices per
cross-attention layer.
"""

from __future__ import annotations

import re
import weakref
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from conceptflow.schema import CONCEPT_REFERENCE
from conceptflow.errors import ConceptflowError


def layer_token(concept_name: str, part: int, layer: int) -> str:
    """The token string of part ``part`` (1 or 2) of a concept at cross-attention layer ``layer``."""
    return f"<{concept_name}{part}_l{layer:02d}>"


def concept_token_strings(concept_name: str, n_layers: int) -> list[str]:
    return [layer_token(concept_name, part, layer) for layer in range(n_layers) for part in (1, 2)]


# {concept: word} per tokenizer for the concepts applied to it that have no tokens of their own and
# are written as a word (Cones 2: its class word, where its residual is added); set while
# ``adapters.branched`` applies them (``set_prompt_words``), read by ``encode_layerwise``.
_PROMPT_WORDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def prompt_words(tokenizer) -> dict[str, str]:
    """The ``<name>`` -> word substitutions active on ``tokenizer`` (empty when none)."""
    return dict(_PROMPT_WORDS.get(tokenizer, {}))


def set_prompt_words(tokenizer, words: Mapping[str, str]) -> dict[str, str]:
    """Make ``words`` the substitutions of ``tokenizer``; returns the previous ones (to restore)."""
    previous = prompt_words(tokenizer)
    _PROMPT_WORDS[tokenizer] = dict(words)
    return previous


def expand_prompt(prompt: str, layer: int, known_concepts: Iterable[str], words: Mapping[str, str] | None = None) -> str:
    """Replace each ``<name>`` of a known concept by its two layer-``layer`` tokens, or, for a
    concept written as a word (``words``, e.g. ``prompt_words(tokenizer)``), by that word."""
    known = set(known_concepts)
    words = words or {}

    def substitute(match: re.Match) -> str:
        name = match.group(1)
        if name in words:
            return words[name]
        if name not in known:
            raise ConceptflowError(
                f"prompt {prompt!r} references <{name}>, which is not a loaded concept; loaded: {sorted(known)}. "
                "Fix the prompt or add the concept to the catalog/combination."
            )
        return f"{layer_token(name, 1, layer)} {layer_token(name, 2, layer)}"

    return CONCEPT_REFERENCE.sub(substitute, prompt)


def class_word_prompt(prompt: str, class_words: Mapping[str, str]) -> str:
    """The prompt with each ``<name>`` replaced by its class word (for the base model and CLIP-T)."""
    return CONCEPT_REFERENCE.sub(lambda m: class_words.get(m.group(1), m.group(1)), prompt)


def add_concept_tokens(tokenizer, text_encoder, concept_name: str, n_layers: int) -> list[int]:
    """Register the concept's layer tokens in the tokenizer and grow the embedding table."""
    tokens = concept_token_strings(concept_name, n_layers)
    missing = [t for t in tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing)
        text_encoder.resize_token_embeddings(len(tokenizer))
    return tokenizer.convert_tokens_to_ids(tokens)


def initial_embeddings(tokenizer, text_encoder, class_word: str, n_layers: int, generator: torch.Generator) -> torch.Tensor:
    """Init as Mix-of-Show: part 1 random at the table's scale, part 2 the class word's embedding.

    Returns (n_layers * 2, dim) ordered as ``concept_token_strings``.
    """
    table = text_encoder.get_input_embeddings().weight.detach()
    class_ids = tokenizer(class_word, add_special_tokens=False).input_ids
    class_embedding = table[class_ids].mean(dim=0)
    random_part = torch.randn(n_layers, table.shape[1], generator=generator) * table.std()
    rows = []
    for layer in range(n_layers):
        rows.extend([random_part[layer].to(table.dtype), class_embedding])
    return torch.stack(rows)


class ConceptEmbeddings(nn.Module):
    """Trainable embeddings of new tokens, substituted into the text encoder's lookup.

    Only these rows are parameters, so the optimiser never touches (or decays) the rest of
    the vocabulary; a forward hook on the input embedding swaps them in.
    """

    def __init__(self, token_ids: Sequence[int], initial: torch.Tensor):
        super().__init__()
        self.register_buffer("token_ids", torch.tensor(list(token_ids), dtype=torch.long), persistent=False)
        self.weight = nn.Parameter(initial.clone())
        self._handle = None

    def attach(self, text_encoder) -> "ConceptEmbeddings":
        embedding = text_encoder.get_input_embeddings()
        self._handle = embedding.register_forward_hook(self._substitute)
        return self

    def detach_hook(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _substitute(self, module, inputs, output):
        input_ids = inputs[0]
        matches = input_ids.unsqueeze(-1) == self.token_ids.to(input_ids.device)
        is_new = matches.any(dim=-1, keepdim=True)
        rows = self.weight.to(output.dtype)[matches.float().argmax(dim=-1)]
        return torch.where(is_new, rows, output)

    def mean_norm(self) -> float:
        return float(self.weight.detach().norm(dim=-1).mean())


def write_embeddings(tokenizer, text_encoder, embeddings: Mapping[str, torch.Tensor]) -> None:
    """Add tokens (if new) and write their embedding rows into the text encoder's table."""
    missing = [token for token in embeddings if token not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing)
        text_encoder.resize_token_embeddings(len(tokenizer))
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for token, vector in embeddings.items():
            table[tokenizer.convert_tokens_to_ids(token)] = vector.to(table.dtype).to(table.device)


def encode_layerwise(prompts: Sequence[str], tokenizer, text_encoder, n_layers: int,
                     known_concepts: Iterable[str] = ()) -> torch.Tensor:
    """Encode prompts for every cross-attention layer in one text-encoder call.

    Returns (batch, n_layers, max_length, dim). Prompts without concept references are
    encoded once and repeated across layers.
    """
    known = list(known_concepts)
    device = text_encoder.device
    if not any(CONCEPT_REFERENCE.search(p) for p in prompts):
        ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        hidden = text_encoder(ids)[0]
        return hidden.unsqueeze(1).expand(-1, n_layers, -1, -1)
    words = prompt_words(tokenizer)
    variants = [expand_prompt(p, layer, known, words) for p in prompts for layer in range(n_layers)]
    ids = tokenizer(variants, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids.to(device)
    hidden = text_encoder(ids)[0]
    return hidden.view(len(prompts), n_layers, hidden.shape[1], hidden.shape[2])


def token_positions(prompt: str, tokenizer, concept_name: str, layer: int = 0) -> list[int]:
    """Positions (in the padded token sequence) of a concept's two tokens in ``prompt``."""
    referenced = CONCEPT_REFERENCE.findall(prompt)
    ids = tokenizer(expand_prompt(prompt, layer, referenced) if referenced else prompt,
                    padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    wanted = set(tokenizer.convert_tokens_to_ids([layer_token(concept_name, 1, layer), layer_token(concept_name, 2, layer)]))
    return [i for i, token_id in enumerate(ids) if token_id in wanted]
