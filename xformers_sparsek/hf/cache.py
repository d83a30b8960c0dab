"""Placeholder: the constant-memory decode cache lands with branch ``cache``."""


class SparseKHFCache:  # pragma: no cover
    def __init__(self, *a, **k):
        raise NotImplementedError("SparseKHFCache needs xformers_sparsek.cache (branch `cache`)")
