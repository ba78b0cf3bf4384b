"""The demo shop: a generated product catalog, its evaluation, and the end-to-end demo."""
