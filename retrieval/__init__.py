"""clipsearch read side: encoders, the on-disk store format, and the query engine.

Importing this package is cheap: torch, open_clip and faiss are imported inside the
functions that need them.
"""

__version__ = "0.1.0"
