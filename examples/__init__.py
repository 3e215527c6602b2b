"""Runnable examples, each smoke-tested; a regular package so that `examples.text_experiments` is this folder's
(an installed peer library ships a top-level `examples` package that would shadow a namespace package)."""
