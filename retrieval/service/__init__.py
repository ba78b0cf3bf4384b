"""The HTTP service (``clipsearch serve``): FastAPI app, micro-batching, admission control.

Needs the ``serve`` extra (FastAPI, uvicorn). Import :func:`clipsearch.retrieval.service.app.create_app`
or :func:`clipsearch.retrieval.service.server.serve` directly; this package imports nothing heavy.
"""
