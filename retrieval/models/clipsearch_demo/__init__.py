"""Tokenizer, text-tower config and model card of clipsearch-demo."""
