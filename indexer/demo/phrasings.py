"""How shoppers type, in words the demo model never saw: the evaluation's paraphrases.

Everything here is **held out from training**: no word of these synonyms and phrasings
occurs in any training caption (the catalog's captions and titles, the ``shop``
templates, the Chinese translation templates). ``tests/indexer/test_demo_data.py``
checks that, so a paraphrase score measures what the text tower already knew about
language, not what the demo catalog taught it. Do not import this module from training
code, and do not add these words to the catalog or its templates.
"""

from __future__ import annotations

# Everyday synonyms of each colour, pattern and kind (English).
COLOUR_SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("crimson", "scarlet"),
    "orange": ("tangerine", "amber"),
    "yellow": ("lemon", "mustard"),
    "green": ("emerald", "olive"),
    "blue": ("navy", "azure"),
    "purple": ("violet", "lilac"),
    "pink": ("rose", "fuchsia"),
    "brown": ("chocolate", "tan"),
    "black": ("jet", "ebony"),
    "white": ("ivory", "snow"),
}
PATTERN_SYNONYMS: dict[str, tuple[str, ...]] = {
    "plain": ("solid", "block colour"),
    "striped": ("stripy", "pinstripe"),
    "dotted": ("polka dot", "spotty"),
    "checked": ("plaid", "gingham"),
}
KIND_SYNONYMS: dict[str, tuple[str, ...]] = {
    "t-shirt": ("tee", "tees"),
    "dress": ("gown", "frock"),
    "sneaker": ("trainers", "running shoes"),
    "boot": ("booties", "wellies"),
    "hat": ("cap", "beanie"),
    "bag": ("handbag", "tote"),
    "watch": ("wristwatch", "timepiece"),
    "mug": ("cup", "coffee cup"),
    "lamp": ("table light", "lampshade"),
    "chair": ("armchair", "seat"),
}
# Phrasings around the three slots; none of their words occurs in training captions.
PHRASINGS: tuple[str, ...] = (
    "{colour} {pattern} {kind}",
    "looking for {colour} {pattern} {kind}",
    "do you sell {pattern} {kind} colored {colour}",
    "need {pattern} {colour} {kind} please",
    "{kind}, {colour}, {pattern}",
)

# Chinese phrasings a shopper types that the training templates never use, built from
# the training's Chinese words: they test the phrasing, not unseen characters.
PHRASINGS_ZH: tuple[str, ...] = (
    "我想买{colour_zh}{pattern_zh}{kind_zh}",
    "有没有{colour_zh}{pattern_zh}{kind_zh}",
    "找{pattern_zh}{colour_zh}{kind_zh}",
)
