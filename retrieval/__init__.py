"""clipsearch read side: encoders, the on-disk store format, the query engine, the service.

Importing this package is cheap: torch, open_clip and faiss are imported inside the
functions that need them.
"""
