"""Corpus preparation (``fastlm prepare``) and the loader over its shards."""
