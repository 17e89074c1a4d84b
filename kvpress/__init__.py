"""kvpress: KV-cache compression for Hugging Face transformers."""
