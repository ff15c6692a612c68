"""Procedural images with captions generated from their parameters (numpy + Pillow only).

Used to train and evaluate the built-in ``tiny-vlm`` projector and to build image tasks.
Everything is a pure function of its arguments and the ``numpy.random.Generator`` passed
in, so a seed fixes every image and caption. No torch: the device side imports this too.

Conventions: ``x``, ``y`` are the object's centre and ``size`` its extent (diameter of the
bounding circle), all as fractions of the square canvas; ``y`` grows downwards.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from edgekv.errors import MissingDependencyError

try:
    from PIL import Image, ImageDraw, ImageFont
except ImportError:  # the built-in image tasks import this module on first use
    raise MissingDependencyError("the built-in image tasks need Pillow: pip install 'edgekv[vision]'") from None

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "yellow": (240, 205, 20),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "centre")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six")
TEXT_COLOURS: dict[str, tuple[int, int, int]] = {"black": (0, 0, 0), **COLOURS}

_CENTRE_HALF_WIDTH = 0.15  # |x-0.5| and |y-0.5| both below this -> "centre"


@dataclass(frozen=True)
class Obj:
    """One filled shape on the canvas."""

    shape: str
    colour: str
    x: float
    y: float
    size: float

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"Obj.shape: {self.shape!r} is not one of {SHAPES}")
        if self.colour not in COLOURS:
            raise ValueError(f"Obj.colour: {self.colour!r} is not one of {tuple(COLOURS)}")
        for name in ("x", "y", "size"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Obj.{name}: {value} is outside [0, 1]")


@dataclass(frozen=True)
class Scene:
    """A set of objects drawn in order on a plain background."""

    objects: tuple[Obj, ...]
    background: tuple[int, int, int] = (255, 255, 255)


def _overlaps(a: Obj, b: Obj, margin: float = 0.02) -> bool:
    return float(np.hypot(a.x - b.x, a.y - b.y)) < (a.size + b.size) / 2 + margin


def random_scene(
    rng: np.random.Generator,
    num_objects: int | tuple[int, int] = 1,
    shapes=SHAPES,
    colours=tuple(COLOURS),
) -> Scene:
    """A scene of non-overlapping objects with random shape, colour, place and size.

    ``num_objects`` is a count or an inclusive ``(low, high)`` range. Single objects are
    large (size 0.35-0.5); several objects are smaller (0.18-0.3) so they fit.
    """
    if isinstance(num_objects, tuple):
        low, high = num_objects
        count = int(rng.integers(low, high + 1))
    else:
        count = int(num_objects)
    if not 1 <= count <= len(NUMBER_WORDS) - 1:
        raise ValueError(f"num_objects: {count} is outside [1, {len(NUMBER_WORDS) - 1}]")
    shapes, colours = tuple(shapes), tuple(colours)
    lo, hi = (0.35, 0.5) if count == 1 else (0.18, 0.3)
    objects: list[Obj] = []
    while len(objects) < count:
        size = float(rng.uniform(lo, hi))
        half = size / 2 + 0.02
        obj = Obj(
            shape=shapes[int(rng.integers(len(shapes)))],
            colour=colours[int(rng.integers(len(colours)))],
            x=float(rng.uniform(half, 1 - half)),
            y=float(rng.uniform(half, 1 - half)),
            size=size,
        )
        if not any(_overlaps(obj, other) for other in objects):
            objects.append(obj)
    return Scene(objects=tuple(objects))


def count_scene(rng: np.random.Generator, count: int, shape: str, colour: str) -> Scene:
    """``count`` identical-looking objects (same shape and colour) at random places."""
    return random_scene(rng, count, shapes=(shape,), colours=(colour,))


def _star_points(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5  # 5 outer + 5 inner vertices
    radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
    return [(cx + q * np.cos(a), cy + q * np.sin(a)) for a, q in zip(angles, radii, strict=True)]


def _draw_obj(draw: ImageDraw.ImageDraw, obj: Obj, canvas: int) -> None:
    cx, cy, r = obj.x * canvas, obj.y * canvas, obj.size * canvas / 2
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif obj.shape == "square":
        s = r * 0.85  # same visual weight as the circle
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif obj.shape == "triangle":
        pts = [(cx, cy - r), (cx + r * 0.94, cy + r * 0.7), (cx - r * 0.94, cy + r * 0.7)]
        draw.polygon(pts, fill=fill)
    elif obj.shape == "star":
        draw.polygon(_star_points(cx, cy, r), fill=fill)
    else:  # pragma: no cover - Obj validates shape
        raise ValueError(f"unknown shape {obj.shape!r}")


def render_scene(scene: Scene, size: int = 128) -> Image.Image:
    """Draw the scene as an RGB image of ``size`` x ``size`` (2x supersampled, antialiased)."""
    big = size * 2
    image = Image.new("RGB", (big, big), scene.background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_obj(draw, obj, big)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def position_name(obj: Obj) -> str:
    """Where the object is: "centre" near the middle, else the dominant direction."""
    dx, dy = obj.x - 0.5, obj.y - 0.5
    if abs(dx) < _CENTRE_HALF_WIDTH and abs(dy) < _CENTRE_HALF_WIDTH:
        return "centre"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _position_phrase(position: str) -> str:
    return "in the centre" if position == "centre" else f"on the {position}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _plural(shape: str) -> str:
    return shape + "s"


def caption(scene: Scene) -> str:
    """Describe the scene from its parameters.

    One object: "a red triangle on the left" ("an orange ..." before a vowel). Several objects of one colour and shape:
    "two blue squares". Otherwise groups joined by "and" in first-appearance order:
    "a red circle on the top and two green stars".
    """
    if not scene.objects:
        return "nothing"
    groups: dict[tuple[str, str], list[Obj]] = {}
    for obj in scene.objects:
        groups.setdefault((obj.colour, obj.shape), []).append(obj)
    phrases = []
    for (colour, shape), members in groups.items():
        if len(members) == 1:
            where = _position_phrase(position_name(members[0]))
            phrases.append(f"{_article(colour)} {colour} {shape} {where}")
        else:
            phrases.append(f"{NUMBER_WORDS[len(members)]} {colour} {_plural(shape)}")
    return " and ".join(phrases)


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits  # bundled with scikit-learn, no download
    except ImportError:
        raise MissingDependencyError("the digit images need scikit-learn (a host extra): "
                                     "pip install 'edgekv[host]'") from None

    data = load_digits()
    return data.images.astype(np.float32), data.target.astype(np.int64)  # [1797, 8, 8], [1797]


def digit_indices(digit: int | None = None, split: str = "all") -> np.ndarray:
    """Indices into sklearn's digits: ``split`` "train" (even), "test" (odd) or "all"."""
    _, targets = _digits()
    idx = np.arange(len(targets))
    if split == "train":
        idx = idx[idx % 2 == 0]
    elif split == "test":
        idx = idx[idx % 2 == 1]
    elif split != "all":
        raise ValueError(f"split: {split!r} is not one of 'train', 'test', 'all'")
    if digit is not None:
        if not 0 <= digit <= 9:
            raise ValueError(f"digit: {digit} is outside 0-9")
        idx = idx[targets[idx] == digit]
    return idx


def digit_image(
    rng: np.random.Generator, digit: int | None = None, size: int = 128, split: str = "all"
) -> tuple[Image.Image, int]:
    """A handwritten digit from scikit-learn's bundled 8x8 set, dark on white, upscaled.

    The sample (and the digit, when ``digit`` is None) is chosen with ``rng``.
    Returns ``(image, digit)``.
    """
    images, targets = _digits()
    idx = digit_indices(digit, split)
    i = int(idx[int(rng.integers(len(idx)))])
    grey = (255.0 - images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # [8, 8]
    small = Image.fromarray(grey, mode="L")
    inner = int(round(size * 0.75))  # leave a white margin like a written page
    big = small.resize((inner, inner), Image.Resampling.BILINEAR)
    canvas = Image.new("L", (size, size), 255)
    offset = (size - inner) // 2
    canvas.paste(big, (offset, offset))
    return canvas.convert("RGB"), int(targets[i])


@functools.lru_cache(maxsize=32)
def _font(pixels: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=pixels)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def text_image(
    word: str, rng: np.random.Generator | None = None, size: int = 128, colour: str = "black"
) -> Image.Image:
    """``word`` in Pillow's default font, scaled to about 80% of the width, on white.

    With ``rng`` the text is shifted by a few pixels (still fully visible).
    """
    if colour not in TEXT_COLOURS:
        raise ValueError(f"colour: {colour!r} is not one of {tuple(TEXT_COLOURS)}")
    if not word:
        raise ValueError("word: empty; pass at least one character")
    big = size * 2
    font = _font(max(8, big // 3))
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    left, top, right, bottom = probe.textbbox((0, 0), word, font=font)
    w, h = max(1, right - left), max(1, bottom - top)
    text = Image.new("L", (w, h), 0)
    ImageDraw.Draw(text).text((-left, -top), word, fill=255, font=font)
    scale = min(0.8 * big / w, 0.5 * big / h)
    tw, th = max(1, int(w * scale)), max(1, int(h * scale))
    text = text.resize((tw, th), Image.Resampling.LANCZOS)
    dx = dy = 0
    if rng is not None:
        dx = int(rng.integers(-(big - tw) // 6, (big - tw) // 6 + 1))
        dy = int(rng.integers(-(big - th) // 6, (big - th) // 6 + 1))
    canvas = Image.new("RGB", (big, big), (255, 255, 255))
    ink = Image.new("RGB", (tw, th), TEXT_COLOURS[colour])
    canvas.paste(ink, ((big - tw) // 2 + dx, (big - th) // 2 + dy), mask=text)
    return canvas.resize((size, size), Image.Resampling.LANCZOS)
