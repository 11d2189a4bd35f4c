"""Batches from token stores in a deterministic, resumable global order.

    config.py     the ``data`` section
    order.py      global sample order (Feistel permutation per store and epoch) and mixtures
    windows.py    a split's units (windows, packed examples, examples) across the run's stores
    packing.py    packing whole examples into windows (sft), deterministic
    examples.py   the units of fine-tuning stores: packed windows, source/target pairs
    loader.py     training micro-batches for one rank, prefetched, with a resumable state
    eval_set.py   the fixed evaluation windows of a split

What a unit becomes (next-token inputs, span-corrupted pairs, masked fine-tuning batches) is
the task's business (pipeline/tasks/).
"""
