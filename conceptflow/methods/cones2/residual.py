"""Cones 2's text-side equations: the embedding regulariser and the residual at the class word.

Reference ali-vilab/Cones-V2 ``train_cones2.py``: the prompt is the class word alone
(``--instance_prompt flower``), so its tokens are ``<bos> flower <eos> <pad>...``;

* regulariser (l.737-742): r1·‖e₀ − e₀*‖₂ + r2·‖e_rest − e*_rest‖₂, e the tuned encoder's last
  hidden state, e* the base's on the same ids (the reference takes it at iteration 0, when the
  encoder is still the base), e₀ the BOS row, e_rest every row after the class word (EOS and
  padding); plain (not squared) L2 / Frobenius norms;
* residual (l.800-820): over the 27 templates "a photo of a {}" ... with the class word, the
  mean of (tuned − base output) at the class word's first position.
"""

from __future__ import annotations

from typing import Sequence

import torch

from conceptflow.errors import ConceptflowError

# train_cones2.py's PROMPT_TEMPLETE, in its order
RESIDUAL_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)


def class_word_token(tokenizer, class_word: str) -> int:
    """The one token id of ``class_word``; a word the tokenizer splits is refused (the residual
    is one vector at one position, and run-time residuals are looked up by a single token)."""
    ids = tokenizer(class_word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ConceptflowError(
            f"cones2 needs a class word that is one token; {class_word!r} splits into {len(ids)} tokens "
            f"{tokenizer.convert_ids_to_tokens(ids)}: give the concept a one-token class word (e.g. its last word)")
    return ids[0]


def prompt_ids(tokenizer, prompts: Sequence[str], pad_prompts: bool) -> torch.Tensor:
    """(N, T) ids padded to the tokenizer's 77 (reference), or to the longest prompt (``pad_prompts``)."""
    padding = "longest" if pad_prompts else "max_length"
    return tokenizer(list(prompts), padding=padding, max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def first_position(ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """(N,) the first position of ``token_id`` in each row of ``ids``; a row without it is refused."""
    hits = ids == token_id
    if not bool(hits.any(dim=1).all()):
        raise ConceptflowError(f"token id {token_id} is missing from a prompt (truncated?)")
    return hits.float().argmax(dim=1)


def embedding_regulariser(hidden: torch.Tensor, target: torch.Tensor, word_position: int,
                          bos_weight: float, rest_weight: float) -> torch.Tensor:
    """r1·‖e₀ − e₀*‖ + r2·‖e_rest − e*_rest‖ for one prompt's (T, D) outputs, e_rest = rows after the word."""
    hidden, target = hidden.float(), target.float()
    first = torch.linalg.vector_norm(hidden[:1] - target[:1])
    rest = torch.linalg.vector_norm(hidden[word_position + 1:] - target[word_position + 1:])
    return bos_weight * first + rest_weight * rest


@torch.no_grad()
def outputs_at_word(text_encoder, tokenizer, class_word: str, templates: Sequence[str] = RESIDUAL_TEMPLATES,
                    pad_prompts: bool = False) -> torch.Tensor:
    """(len(templates), D): the encoder's last hidden state at the class word in each template."""
    token_id = class_word_token(tokenizer, class_word)
    ids = prompt_ids(tokenizer, [template.format(class_word) for template in templates], pad_prompts)
    ids = ids.to(text_encoder.device)
    hidden = text_encoder(ids)[0].float()
    positions = first_position(ids, token_id)
    return hidden[torch.arange(len(templates), device=hidden.device), positions]


def mean_residual(tuned_at_word: torch.Tensor, base_at_word: torch.Tensor) -> torch.Tensor:
    """(D,) mean over templates of tuned − base at the class word (the reference's residual.pt)."""
    return (tuned_at_word.float() - base_at_word.float()).mean(dim=0)
