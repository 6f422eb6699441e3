"""Data: text -> ArrayRecord (prepare) and ArrayRecord -> global batches (pipeline)."""
