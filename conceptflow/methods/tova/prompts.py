"""ToVA's prompt regularisation: a different prompt for each training step.

ConceptSplit (supplement A, "ToVA") trains with "prompt regularization, as proposed in Cones2":
about 200 prompts written with ChatGPT, a different one per iteration (the reference reads 199
of them from ``training_scripts/prompt_template.txt``). These are this project's own prompts in
the same style (the reference's file is not copied): photo, rendering and art-style variants,
adjectives, viewpoints and light, each with ``{}`` where the concept reference ``<name>`` goes.
Varied context around the token keeps the value update from absorbing one caption's wording.
"""

from __future__ import annotations

_STYLES = ("a photo of", "a rendering of", "a close-up photo of", "a cropped photo of", "a good photo of",
           "a bright photo of", "a dark photo of", "a blurry photo of", "a picture of", "an image of",
           "a drawing of", "a painting of", "a sketch of", "an illustration of", "a snapshot of",
           "a portrait of", "a 3D rendering of", "a black and white photo of", "a vintage photo of",
           "a high-resolution photo of", "a watercolor painting of", "a pencil drawing of", "a macro photo of",
           "a wide-angle photo of", "a studio photo of")
_ARTICLES = ("a", "the")
_SETTINGS = ("", " on a table", " in a garden", " on the floor", " in a room", " at night", " in the snow",
             " on the grass", " under soft light", " against a plain background")

_PAIRS = [(style, article) for style in _STYLES for article in _ARTICLES]
# each (style, article) pair: plainly, and in three of the nine settings (cycling), 200 prompts
PROMPT_TEMPLATES = tuple(
    f"{style} {article} {{}}{setting}"
    for index, (style, article) in enumerate(_PAIRS)
    for setting in ("", *(_SETTINGS[1 + (3 * index + k) % (len(_SETTINGS) - 1)] for k in range(3)))
)
