"""Concept Conductor's branch prompts: the base prompt names every concept by its class word; the
prompt of concept i's branch keeps ``<i>`` and names the other concepts by their class words.

"a <dog> and a <cat> on the beach" -> base "a dog and a cat on the beach", dog branch
"a <dog> and a cat on the beach", cat branch "a dog and a <cat> on the beach". Where the class
word already follows the reference ("a photo of <dog> dog") the reference is dropped instead
(as ``metrics.scores.strip_concept_references`` does for CLIP-T).
"""

from __future__ import annotations

import re
from typing import Mapping

from conceptflow.errors import ConceptflowError
from conceptflow.schema import CONCEPT_REFERENCE


def class_words_of(adapters: Mapping[str, object]) -> dict[str, str]:
    """{concept: class word} from each adapter's ``concept.json`` meta (``meta["class_word"]``)."""
    words = {}
    for name, effects in adapters.items():
        word = getattr(effects, "meta", {}).get("class_word")
        if not word:
            raise ConceptflowError(f"concept {name!r}: its adapter's concept.json has no class_word; the conductor "
                                   "sampler names the other concepts of a branch prompt by their class words")
        words[name] = str(word)
    return words


def branch_prompt(prompt: str, class_words: Mapping[str, str], keep: str | None = None) -> str:
    """``prompt`` with every ``<name>`` except ``<keep>`` replaced by its class word."""

    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name == keep:
            return match.group(0)
        if name not in class_words:
            raise ConceptflowError(f"prompt {prompt!r} references <{name}>, which has no adapter here "
                                   f"(known: {sorted(class_words)})")
        word = class_words[name]
        following = prompt[match.end():].lstrip()
        return "" if re.match(rf"{re.escape(word)}\b", following, flags=re.IGNORECASE) else word

    return re.sub(r"\s+", " ", CONCEPT_REFERENCE.sub(replace, prompt)).strip()


def concepts_of(prompt: str) -> list[str]:
    """The concepts ``prompt`` references, in order of first appearance (one branch each)."""
    return list(dict.fromkeys(CONCEPT_REFERENCE.findall(prompt)))
