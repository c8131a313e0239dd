"""The toy world: seeded, captioned 64 px scenes of coloured shapes with ground truth.

A scene is a background (a solid or vertical-gradient colour from a small palette) and one to
three objects. An object is a *look* (which shapes make it and how it is filled) placed at a
centre with a radius. Objects the vocabulary can describe have one shape, one colour, one of
four fill patterns, a size word and a position word; concepts (``conceptflow.toy.concepts``)
are looks the vocabulary cannot describe. Every rendered object keeps its visible mask.

Shapes are drawn at 4x and box-filtered down, so edges are anti-aliased; an object's mask is
where its coverage exceeds one half, minus what later objects cover.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4

SHAPES = ("circle", "square", "triangle", "star", "heart", "ring", "cross", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 25),
    "green": (35, 160, 55),
    "blue": (35, 75, 215),
    "purple": (135, 45, 185),
    "pink": (245, 115, 180),
    "black": (25, 25, 25),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 240),
    "sand": (225, 205, 160),
    "sky": (165, 205, 240),
    "grass": (165, 210, 145),
    "grey": (145, 145, 145),
    "night": (40, 40, 75),
}
PATTERNS = ("plain", "striped", "dotted", "checkered")
# Radii in pixels. With 16x16 latents a shape needs several latent pixels across to be drawable:
# a small object spans ~4-5 of them, a big one ~6-7.
SIZES: dict[str, tuple[float, float]] = {"small": (8.5, 9.5), "big": (12.5, 14.0)}
# Where an object sits is nearly fixed by its caption (slot +- 1 px across, +- 3 px down for a
# single object): a tiny model learns a near-deterministic caption -> layout map far faster
# than one that must spread objects over a wide range.
JITTER_X, JITTER_Y = 1.0, 3.0
# Horizontal slots; several objects take distinct slots so captions can name where each is.
# Two objects take the left and right slots; three (all small) spread out to the edges.
POSITIONS: dict[str, float] = {"left": 17.0, "center": 32.0, "right": 47.0}
THREE_OBJECT_POSITIONS: dict[str, float] = {"left": 12.0, "center": 32.0, "right": 52.0}
POSITION_PHRASES = {"left": "on the left", "center": "in the center", "right": "on the right"}
# An object colour must differ from the background by at least this RGB distance.
MIN_CONTRAST = 110.0
OBJECT_COUNT_WEIGHTS = (0.5, 0.35, 0.15)  # P(1), P(2), P(3) objects


# --- shapes: alpha coverage of a unit-radius shape centred at (cx, cy) with radius r ---------

def _polygon(points: Sequence[tuple[float, float]]):
    def draw(canvas: ImageDraw.ImageDraw, cx: float, cy: float, r: float) -> None:
        canvas.polygon([(cx + x * r, cy + y * r) for x, y in points], fill=255)
    return draw


def _star_points(tips: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    angles = np.pi * np.arange(2 * tips) / tips - np.pi / 2
    radii = np.where(np.arange(2 * tips) % 2 == 0, 1.0, inner)
    return list(zip(radii * np.cos(angles), radii * np.sin(angles) + 0.08))


def _heart_points(count: int = 48) -> list[tuple[float, float]]:
    t = np.linspace(0, 2 * np.pi, count, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return list(zip(x / 16.5, (y + 2.5) / 15.0))


def _draw_circle(canvas, cx, cy, r):
    canvas.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)


def _draw_ring(canvas, cx, cy, r):
    canvas.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    inner = 0.55 * r
    canvas.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)


def _draw_cross(canvas, cx, cy, r):
    arm = 0.34 * r
    canvas.rectangle([cx - arm, cy - r, cx + arm, cy + r], fill=255)
    canvas.rectangle([cx - r, cy - arm, cx + r, cy + arm], fill=255)


SHAPE_DRAWERS: dict[str, Callable] = {
    "circle": _draw_circle,
    "square": _polygon([(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)]),
    "triangle": _polygon([(0.0, -1.0), (0.95, 0.72), (-0.95, 0.72)]),
    "star": _polygon(_star_points()),
    "heart": _polygon(_heart_points()),
    "ring": _draw_ring,
    "cross": _draw_cross,
    "diamond": _polygon([(0.0, -1.0), (0.72, 0.0), (0.0, 1.0), (-0.72, 0.0)]),
}


def shape_coverage(shape: str, center: tuple[float, float], radius: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """(size, size) float coverage in [0, 1] of ``shape`` drawn at 4x and box-filtered down."""
    big = size * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    # continuous coordinates: pixel i spans [i, i + 1), so (32, 32) is the image centre
    SHAPE_DRAWERS[shape](ImageDraw.Draw(canvas), center[0] * SUPERSAMPLE, center[1] * SUPERSAMPLE,
                         radius * SUPERSAMPLE)
    small = canvas.resize((size, size), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


# --- fills: which of a look's colours each pixel takes --------------------------------------

def _pixel_grid(size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    return xs + 0.5, ys + 0.5


def fill_index(fill: str, center: tuple[float, float], radius: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """(size, size) int array: the index into the look's colours each pixel takes.

    Vocabulary patterns (plain/striped/dotted/checkered) have a period in pixels; concept fills
    are laid out in object-relative units (u, v) = (pixel - centre) / radius, so they scale
    with the object as an instance's markings would.
    """
    xs, ys = _pixel_grid(size)
    u, v = (xs - center[0]) / radius, (ys - center[1]) / radius
    if fill == "plain":
        index = np.zeros_like(xs)
    elif fill == "striped":  # diagonal bands, 3 px on, 3 px off
        index = np.floor((xs + ys) / 3.0) % 2
    elif fill == "dotted":
        index = ((np.abs((xs % 5.0) - 2.5) < 1.1) & (np.abs((ys % 5.0) - 2.5) < 1.1))
    elif fill == "checkered":
        index = (np.floor(xs / 4.0) + np.floor(ys / 4.0)) % 2
    elif fill == "zigzag":  # horizontal zig-zag bands
        index = np.floor(v * 2.5 + 0.8 * np.abs((u * 2.5) % 2.0 - 1.0)) % 2
    elif fill == "split":  # left half / right half
        index = u >= 0
    elif fill == "quarters":
        index = (u >= 0) ^ (v >= 0)
    elif fill == "concentric":
        index = np.floor(np.sqrt(u ** 2 + v ** 2) * 3.2) % 2
    elif fill == "eye":  # a disc of the second colour at the centre
        index = np.sqrt(u ** 2 + v ** 2) < 0.38
    elif fill == "bands":  # three vertical bands: first, second, first
        index = np.abs(u) < 0.33
    elif fill == "rim":  # an outer rim of the second colour
        index = np.maximum(np.abs(u), np.abs(v)) > 0.62
    elif fill == "tricolour":  # three horizontal bands in three colours
        index = np.clip(np.floor((v + 1.0) * 1.5), 0, 2)
    else:
        raise ValueError(f"unknown fill {fill!r}")
    return index.astype(np.int64)


VOCAB_FILLS = PATTERNS
CONCEPT_FILLS = ("zigzag", "split", "quarters", "concentric", "eye", "bands", "rim", "tricolour")


def lighter(colour: tuple[int, int, int], amount: float = 0.6) -> tuple[int, int, int]:
    """``colour`` mixed with white: the second tone of the vocabulary patterns."""
    return tuple(int(round(c * (1 - amount) + 255 * amount)) for c in colour)


@dataclass(frozen=True)
class Look:
    """How an object looks regardless of where it is: shape parts and a coloured fill.

    ``parts`` are (shape, scale) pairs drawn together (a ring around a cross is
    ``(("ring", 1.0), ("cross", 0.6))``); ``colours`` are indexed by the fill.
    """

    parts: tuple[tuple[str, float], ...]
    fill: str
    colours: tuple[tuple[int, int, int], ...]

    def coverage(self, center: tuple[float, float], radius: float) -> np.ndarray:
        layers = [shape_coverage(shape, center, radius * scale) for shape, scale in self.parts]
        return np.maximum.reduce(layers)

    def fill_colours(self, center: tuple[float, float], radius: float) -> np.ndarray:
        """(H, W, 3) float colours of the fill over the whole canvas."""
        palette = np.asarray(self.colours, dtype=np.float32)
        index = np.minimum(fill_index(self.fill, center, radius), len(palette) - 1)
        return palette[index]


def vocabulary_look(shape: str, colour: str, pattern: str) -> Look:
    base = COLOURS[colour]
    return Look(parts=((shape, 1.0),), fill=pattern, colours=(base, lighter(base)))


@dataclass(frozen=True)
class SceneObject:
    """One placed object. Vocabulary objects fill ``shape``/``colour``/``pattern``/``size``/
    ``position``; a concept instance sets ``concept`` and its ``look`` (its shape is the class)."""

    look: Look
    center: tuple[float, float]
    radius: float
    shape: str
    colour: str | None = None
    pattern: str | None = None
    size: str | None = None
    position: str | None = None
    concept: str | None = None


@dataclass(frozen=True)
class Background:
    name: str
    gradient: bool = False

    def render(self, size: int = IMAGE_SIZE) -> np.ndarray:
        """(size, size, 3) float RGB; a gradient darkens from top to bottom."""
        colour = np.asarray(BACKGROUNDS[self.name], dtype=np.float32)
        image = np.broadcast_to(colour, (size, size, 3)).copy()
        if self.gradient:
            shade = np.linspace(1.12, 0.78, size, dtype=np.float32)[:, None, None]
            image = np.clip(image * shade, 0, 255)
        return image

    @property
    def phrase(self) -> str:
        return f"a {self.name} gradient background" if self.gradient else f"a {self.name} background"


@dataclass(frozen=True)
class Scene:
    background: Background
    objects: tuple[SceneObject, ...]


@dataclass
class RenderedScene:
    """A drawn scene with its ground truth: ``masks[i]`` is object i's visible pixels."""

    scene: Scene
    image: Image.Image
    masks: list[np.ndarray] = field(default_factory=list)
    caption: str = ""


def render(scene: Scene, caption: str = "") -> RenderedScene:
    """Composite the objects in order over the background (later objects occlude earlier)."""
    pixels = scene.background.render()
    masks: list[np.ndarray] = []
    for obj in scene.objects:
        alpha = obj.look.coverage(obj.center, obj.radius)[..., None]
        pixels = pixels * (1 - alpha) + obj.look.fill_colours(obj.center, obj.radius) * alpha
        covered = alpha[..., 0] > 0.5
        masks = [mask & ~covered for mask in masks]
        masks.append(covered)
    image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), "RGB")
    return RenderedScene(scene=scene, image=image, masks=masks, caption=caption)


# --- sampling scenes and captions -----------------------------------------------------------

def _contrast(colour: tuple[int, int, int], background: str) -> float:
    return float(np.linalg.norm(np.subtract(colour, BACKGROUNDS[background], dtype=np.float32)))


def contrasting_colours(background: str) -> list[str]:
    """Object colours readable on ``background`` (yellow on sand or black at night are not)."""
    return [name for name, rgb in COLOURS.items() if _contrast(rgb, background) >= MIN_CONTRAST]


def sample_background(rng: np.random.Generator) -> Background:
    return Background(name=str(rng.choice(list(BACKGROUNDS))), gradient=bool(rng.random() < 0.4))


def sample_scene(rng: np.random.Generator, object_count: int | None = None) -> Scene:
    """A random vocabulary scene: 1-3 objects in distinct horizontal slots (one: any slot; two:
    left and right; three: all, small)."""
    background = sample_background(rng)
    if object_count is None:
        object_count = int(rng.choice([1, 2, 3], p=OBJECT_COUNT_WEIGHTS))
    if object_count == 1:
        slots = [str(rng.choice(list(POSITIONS)))]
    elif object_count == 2:
        slots = ["left", "right"]
    else:
        slots = list(POSITIONS)
    positions = THREE_OBJECT_POSITIONS if object_count == 3 else POSITIONS
    colours = contrasting_colours(background.name)
    objects = []
    for slot in slots:
        shape, colour = str(rng.choice(SHAPES)), str(rng.choice(colours))
        pattern = str(rng.choice(PATTERNS))
        size = str(rng.choice(list(SIZES))) if object_count < 3 else "small"
        radius = float(rng.uniform(*SIZES[size]))
        jitter_y = JITTER_Y if object_count == 1 else JITTER_Y / 2
        center = (positions[slot] + float(rng.uniform(-JITTER_X, JITTER_X)),
                  32.0 + float(rng.uniform(-jitter_y, jitter_y)))
        objects.append(SceneObject(
            look=vocabulary_look(shape, colour, pattern), center=center, radius=radius, shape=shape,
            colour=colour, pattern=pattern, size=size, position=str(slot),
        ))
    return Scene(background=background, objects=tuple(objects))


def object_phrase(obj: SceneObject, size: bool = True, pattern: bool = True, position: bool = True) -> str:
    """"a small red striped star on the left"; the optional words can be left out."""
    words = []
    if size and obj.size:
        words.append(obj.size)
    words.append(obj.colour or "")
    if pattern and obj.pattern and obj.pattern != "plain":
        words.append(obj.pattern)
    words.append(obj.shape)
    text = " ".join(w for w in words if w)
    phrase = ("an " if text[0] in "aeiou" else "a ") + text
    if position and obj.position:
        phrase += " " + POSITION_PHRASES[obj.position]
    return phrase


CAPTION_TEMPLATES = (
    "{objects}, on {background}",
    "{objects} on {background}",
    "{background} with {objects}",
    "{objects}",
)


def caption(scene: Scene, rng: np.random.Generator | None = None, drop_probability: float = 0.0) -> str:
    """A caption naming every object; with ``rng``, a random template and, with probability
    ``drop_probability`` each, size, pattern, position and background words left out (so the
    model also follows terse prompts such as "a red star")."""
    def keep() -> bool:
        return rng is None or rng.random() >= drop_probability

    phrases = [object_phrase(o, size=keep(), pattern=keep(), position=keep()) for o in scene.objects]
    objects = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    if not keep():
        return objects
    template = CAPTION_TEMPLATES[0] if rng is None else CAPTION_TEMPLATES[int(rng.integers(0, 3))]
    return template.format(objects=objects, background=scene.background.phrase)


def make_scene(seed: int, object_count: int | None = None, drop_probability: float = 0.0) -> RenderedScene:
    """The scene of ``seed``: the same seed always gives the same image, masks and caption."""
    rng = np.random.default_rng(seed)
    scene = sample_scene(rng, object_count)
    return render(scene, caption(scene, rng if drop_probability > 0 else None, drop_probability))


def scene_stream(seed: int, drop_probability: float = 0.25, unconditional_probability: float = 0.1):
    """An endless reproducible stream of (image, caption) for pretraining; a fraction of
    captions is empty so classifier-free guidance has an unconditional branch to use."""
    rng = np.random.default_rng(seed)
    while True:
        scene = sample_scene(rng)
        text = caption(scene, rng, drop_probability)
        if rng.random() < unconditional_probability:
            text = ""
        yield render(scene, text)
