"""lowbit: a JAX research suite for compressing large language models."""

__version__ = "0.1.0"
