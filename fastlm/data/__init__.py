"""Corpus preparation (``fastlm prepare``) and the loader over its shards.

Imports are lazy: ``import fastlm.data`` does not import datasets, tokenizers or transformers.
"""

from __future__ import annotations

__all__ = ["prepare", "CleanConfig", "DataError", "BlockLoader", "MixedLoader", "load_tokenizer",
           "open_split"]


def __getattr__(name: str):
    if name == "prepare":
        from fastlm.data.pipeline import prepare

        return prepare
    if name == "CleanConfig":
        from fastlm.data.clean import CleanConfig

        return CleanConfig
    if name == "DataError":
        from fastlm.data.errors import DataError

        return DataError
    if name == "BlockLoader":
        from fastlm.data.loader import BlockLoader

        return BlockLoader
    if name == "MixedLoader":
        from fastlm.data.mix import MixedLoader

        return MixedLoader
    if name == "open_split":
        from fastlm.data.format import open_split

        return open_split
    if name == "load_tokenizer":
        from fastlm.train.generate import load_tokenizer

        return load_tokenizer
    raise AttributeError(f"module 'fastlm.data' has no attribute {name!r}")
