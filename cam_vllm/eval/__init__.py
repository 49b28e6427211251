"""Evaluation harness: perplexity, zero-shot multiple choice, retrieval, ablations.

One module per task family (:mod:`.perplexity`, :mod:`.multiple_choice`, :mod:`.needle`), the
engines behind one protocol (:mod:`.engines`: the reference engine; :mod:`.parallel`: the same
token-by-token semantics in one batched forward), budgets (:mod:`.budget`), the grid runner
(:mod:`.runner`, :mod:`.tasks`), results (:mod:`.results`) and the ``cam-vllm eval`` command
(:mod:`.cli`). Importing this package is cheap (no torch).
"""
