"""Tokenizer merging (mergekit's ``tokenizer_source`` / ``tokenizer:`` / ``chat_template``):
the output vocabulary, embedding/LM-head rows remapped per token through views, tokenizer files."""
from .build import expand, resolve_chat_template, section, vocab_tensors, write_files  # noqa: F401
from .view import VocabView  # noqa: F401
