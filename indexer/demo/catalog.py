"""The demo shop catalog: products, their attributes, titles, descriptions and captions.

A product is a (kind, colour, pattern) triple plus shop metadata: brand, material, price,
rating, stock, creation date. Everything is drawn from ``numpy.random.default_rng([seed,
i])`` for product ``i``, so product ``i`` is the same whatever the catalog size, and the
same seed always gives the same catalog.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np

# kind -> (category, materials, (min price, max price) in EUR).
KINDS: dict[str, tuple[str, tuple[str, ...], tuple[float, float]]] = {
    "t-shirt": ("apparel", ("cotton", "linen", "organic cotton"), (9.0, 35.0)),
    "dress": ("apparel", ("cotton", "silk", "jersey"), (29.0, 140.0)),
    "sneaker": ("footwear", ("canvas", "leather", "mesh"), (39.0, 150.0)),
    "boot": ("footwear", ("leather", "suede", "rubber"), (69.0, 240.0)),
    "hat": ("accessories", ("wool", "felt", "straw"), (12.0, 65.0)),
    "bag": ("accessories", ("leather", "canvas", "nylon"), (19.0, 190.0)),
    "watch": ("accessories", ("leather-strap", "silicone-strap", "fabric-strap"), (35.0, 350.0)),
    "mug": ("home", ("ceramic", "stoneware", "enamel"), (6.0, 25.0)),
    "lamp": ("home", ("linen", "fabric", "paper"), (25.0, 160.0)),
    "chair": ("home", ("velvet", "fabric", "upholstered"), (59.0, 420.0)),
}

# Colour name -> nominal sRGB. Chosen far apart so that lighting changes never turn one
# into another: the demo model must learn colour, and an ambiguous palette would make
# the quality bar measure the palette instead of the model.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 30, 35),
    "orange": (240, 130, 20),
    "yellow": (245, 215, 40),
    "green": (40, 150, 60),
    "blue": (35, 75, 200),
    "purple": (120, 45, 160),
    "pink": (245, 130, 190),
    "brown": (120, 70, 35),
    "black": (25, 25, 28),
    "white": (242, 242, 238),
}

PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted", "checked")

BRANDS: tuple[str, ...] = (
    "Northwind",
    "Aster & Co",
    "Bluefin",
    "Cobalt Lane",
    "Driftwood",
    "Fjordline",
    "Larkspur",
    "Meridian",
    "Oakhaven",
    "Tidewater",
)

# Shopper words for training captions: other ways people name each kind, colour and
# pattern. Each product carries one of each (``kind_alt``, ...) so that training sees
# varied wording and learns the concept, not one word. The evaluation's unseen synonyms
# (indexer/demo/phrasings.py) are a separate list that shares no word with these.
KIND_ALTS: dict[str, tuple[str, ...]] = {
    "t-shirt": ("tshirt", "top", "crew neck shirt"),
    "dress": ("sundress", "maxi dress", "summer dress"),
    "sneaker": ("sneakers", "kicks", "athletic footwear"),
    "boot": ("boots", "ankle boot", "chelsea boot"),
    "hat": ("fedora", "sunhat", "headwear"),
    "bag": ("purse", "shoulder bag", "satchel"),
    "watch": ("watches", "analog watch", "chronograph"),
    "mug": ("tea mug", "beaker", "stein"),
    "lamp": ("desk lamp", "lantern", "floor lamp"),
    "chair": ("stool", "dining chair", "recliner"),
}
COLOUR_ALTS: dict[str, tuple[str, ...]] = {
    "red": ("ruby", "cherry", "brick red"),
    "orange": ("apricot", "pumpkin", "burnt orange"),
    "yellow": ("golden", "canary", "sunflower"),
    "green": ("lime", "forest green", "sage"),
    "blue": ("sapphire", "indigo", "royal blue"),
    "purple": ("plum", "lavender", "grape"),
    "pink": ("blush", "salmon", "magenta"),
    "brown": ("mocha", "chestnut", "caramel"),
    "black": ("onyx", "charcoal", "midnight black"),
    "white": ("cream", "pearl", "chalk white"),
}
PATTERN_ALTS: dict[str, tuple[str, ...]] = {
    "plain": ("unpatterned", "monochrome", "single tone"),
    "striped": ("stripes", "banded", "lined"),
    "dotted": ("dots", "speckled", "pindot"),
    "checked": ("checkered", "chequered", "tartan"),
}
# Shopper phrasings over the alternative words (templates of the "shop" set).
SHOPPER_TEMPLATES: tuple[str, ...] = (
    "{colour_alt} {pattern_alt} {kind_alt}",
    "i want a {colour_alt} {kind_alt}, {pattern_alt}",
    "show me {pattern_alt} {kind_alt} in {colour_alt}",
    "buy {colour_alt} {pattern_alt} {kind_alt}",
    "{kind_alt} {colour_alt} {pattern_alt}",
    "{kind_alt}",
    "{colour_alt} {kind}",
    "{pattern_alt} {kind}",
    "{colour} {pattern} {kind_alt}",
)

# Caption templates over the product's attributes. Subsets of the attributes appear on
# purpose: shoppers type "red mug" as often as "a red striped mug".
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {colour} {pattern} {kind}",
    "a {colour} {pattern} {kind}",
    "{colour} {pattern} {kind}",
    "a photo of a {colour} {pattern} {kind}",
    "{pattern} {kind} in {colour}",
    "a {pattern} {colour} {kind}",
    "{colour} {kind} with a {pattern} pattern",
    "a {kind} that is {colour} and {pattern}",
    "{title}",
    "{brand} {colour} {pattern} {kind}",
    "a {colour} {kind}",
    "a {pattern} {kind}",
    "{colour} {pattern} {material} {kind}",
    # Kind alone: colour and texture are learned first, the silhouette last; captions
    # that name only the kind keep the model from ignoring it.
    "a {kind}",
    "a photo of a {kind}",
    "{kind}",
    *SHOPPER_TEMPLATES,
)

# Simplified Chinese for every kind, colour and pattern, with the measure word a shopper
# puts before the kind ("一件T恤", "一双运动鞋"). The training captions use these words;
# the evaluation's unseen Chinese phrasings (indexer/demo/phrasings.py) use others.
KINDS_ZH: dict[str, str] = {
    "t-shirt": "T恤",
    "dress": "连衣裙",
    "sneaker": "运动鞋",
    "boot": "靴子",
    "hat": "帽子",
    "bag": "包",
    "watch": "手表",
    "mug": "马克杯",
    "lamp": "台灯",
    "chair": "椅子",
}
MEASURE_ZH: dict[str, str] = {
    "t-shirt": "件",
    "dress": "条",
    "sneaker": "双",
    "boot": "双",
    "hat": "顶",
    "bag": "个",
    "watch": "块",
    "mug": "个",
    "lamp": "盏",
    "chair": "把",
}
COLOURS_ZH: dict[str, str] = {
    "red": "红色",
    "orange": "橙色",
    "yellow": "黄色",
    "green": "绿色",
    "blue": "蓝色",
    "purple": "紫色",
    "pink": "粉色",
    "brown": "棕色",
    "black": "黑色",
    "white": "白色",
}
PATTERNS_ZH: dict[str, str] = {
    "plain": "纯色",
    "striped": "条纹",
    "dotted": "波点",
    "checked": "格子",
}

# Bilingual caption templates: (Chinese, English with the same meaning). The Chinese side
# is sampled as a training caption like the English templates; the pairs also teach the
# text tower's new Chinese tokens (training distils each Chinese caption onto the
# embedding of its English twin, see indexer/training/multilingual.py).
TRANSLATION_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("{colour_zh}{pattern_zh}{kind_zh}", "a {colour} {pattern} {kind}"),
    ("{colour_zh}的{pattern_zh}{kind_zh}", "a {colour} {pattern} {kind}"),
    ("一{measure_zh}{colour_zh}{pattern_zh}{kind_zh}", "a {colour} {pattern} {kind}"),
    ("{pattern_zh}{colour_zh}{kind_zh}", "a {pattern} {colour} {kind}"),
    ("{colour_zh}{kind_zh}", "a {colour} {kind}"),
    ("{pattern_zh}{kind_zh}", "a {pattern} {kind}"),
    ("{kind_zh}", "a {kind}"),
    ("{colour_zh}", "{colour}"),
    ("{pattern_zh}", "{pattern}"),
    ("{brand} {colour_zh}{pattern_zh}{kind_zh}", "{brand} {colour} {pattern} {kind}"),
    ("{title_zh}", "{title}"),
)

_EPOCH = dt.datetime(2023, 1, 1, tzinfo=dt.UTC)
_SPAN_S = 3 * 365 * 24 * 3600
_PATTERN_PHRASE = {
    "plain": "solid {colour}",
    "striped": "{colour} with contrast stripes",
    "dotted": "{colour} with a polka-dot print",
    "checked": "{colour} checked",
}


@dataclass(frozen=True, kw_only=True)
class Product:
    """One product of the demo shop."""

    # Stable identifier and document key: several photos share it.
    sku: str
    # Shop department: apparel, footwear, accessories, home.
    category: str
    # One of KINDS.
    kind: str
    # One of COLOURS.
    colour: str
    # One of PATTERNS.
    pattern: str
    brand: str
    material: str
    # Price in EUR, ending in .99 or .49 like a shop's.
    price: float
    # Average review score, 1.0..5.0, one decimal.
    rating: float
    in_stock: bool
    created_at: dt.datetime
    # Photo views: ("front",) or ("front", "back").
    views: tuple[str, ...]
    # This product's shopper words for its kind, colour and pattern (see KIND_ALTS...).
    kind_alt: str = ""
    colour_alt: str = ""
    pattern_alt: str = ""

    @property
    def title(self) -> str:
        pattern = "" if self.pattern == "plain" else f" {self.pattern}"
        return f"{self.brand} {self.colour}{pattern} {self.material} {self.kind}"

    @property
    def description(self) -> str:
        look = _PATTERN_PHRASE[self.pattern].format(colour=self.colour)
        return (
            f"{article(self.pattern).capitalize()} {self.pattern} {self.colour} {self.kind} from {self.brand}, made of "
            f"{self.material.replace('-', ' ')}: {look}. "
            f"Rated {self.rating:.1f}/5; {'in stock' if self.in_stock else 'currently sold out'}."
        )

    @property
    def title_zh(self) -> str:
        """The title in Simplified Chinese: ``Northwind 红色条纹T恤``."""
        pattern = "" if self.pattern == "plain" else PATTERNS_ZH[self.pattern]
        return f"{self.brand} {COLOURS_ZH[self.colour]}{pattern}{KINDS_ZH[self.kind]}"

    @property
    def caption_zh(self) -> str:
        """The attribute caption in Simplified Chinese: ``红色条纹T恤``."""
        return attribute_caption_zh(self.kind, self.colour, self.pattern)

    @property
    def caption(self) -> str:
        """The canonical attribute caption, e.g. ``a red striped t-shirt``."""
        return attribute_caption(self.kind, self.colour, self.pattern)


def attribute_caption(kind: str, colour: str, pattern: str) -> str:
    """``a red striped mug`` / ``an orange plain hat``: the form the quality bar uses."""
    return f"{article(colour)} {colour} {pattern} {kind}"


def attribute_caption_zh(kind: str, colour: str, pattern: str) -> str:
    """``红色条纹马克杯``: colour, pattern, kind, the order a Chinese shopper types them."""
    return f"{COLOURS_ZH[colour]}{PATTERNS_ZH[pattern]}{KINDS_ZH[kind]}"


def article(word: str) -> str:
    """``an`` before a vowel sound, else ``a`` (good enough for this vocabulary)."""
    return "an" if word[:1] in "aeiou" else "a"


def make_product(seed: int, index: int, *, two_view_fraction: float = 0.25) -> Product:
    """Product number ``index`` of the catalog with this seed (independent of catalog size)."""
    rng = np.random.default_rng([seed, index, 0])
    kinds = list(KINDS)
    kind = kinds[int(rng.integers(len(kinds)))]
    category, materials, (lo, hi) = KINDS[kind]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    pattern = PATTERNS[int(rng.integers(len(PATTERNS)))]
    brand = BRANDS[int(rng.integers(len(BRANDS)))]
    material = materials[int(rng.integers(len(materials)))]
    # Log-uniform: cheap items are more common than expensive ones within a kind.
    raw = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    price = float(max(1, int(raw))) + (0.99 if rng.random() < 0.7 else 0.49)
    rating = float(np.clip(np.round(rng.normal(4.1, 0.6), 1), 1.0, 5.0))
    in_stock = bool(rng.random() < 0.8)
    created_at = _EPOCH + dt.timedelta(seconds=int(rng.integers(_SPAN_S)))
    views = ("front", "back") if rng.random() < two_view_fraction else ("front",)
    # A generator of its own, so that adding these words kept every earlier attribute.
    alt = np.random.default_rng([seed, index, 1])
    return Product(
        sku=f"SKU-{index:06d}",
        category=category,
        kind=kind,
        colour=colour,
        pattern=pattern,
        brand=brand,
        material=material,
        price=round(price, 2),
        rating=rating,
        in_stock=in_stock,
        created_at=created_at,
        views=views,
        kind_alt=KIND_ALTS[kind][int(alt.integers(len(KIND_ALTS[kind])))],
        colour_alt=COLOUR_ALTS[colour][int(alt.integers(len(COLOUR_ALTS[colour])))],
        pattern_alt=PATTERN_ALTS[pattern][int(alt.integers(len(PATTERN_ALTS[pattern])))],
    )
