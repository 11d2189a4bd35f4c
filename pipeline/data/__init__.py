"""Batches from token stores in a deterministic, resumable global order.

    config.py     the ``data`` section
    order.py      global sample order (Feistel permutation per store and epoch) and mixtures
    windows.py    a split's windows across the run's stores
    loader.py     training micro-batches for one rank, prefetched, with a resumable state
    eval_set.py   the fixed evaluation windows of a split

What a window becomes (next-token inputs, span-corrupted pairs) is the task's business
(pipeline/tasks/).
"""
