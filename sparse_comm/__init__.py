"""What ``dgc``, ``sparse_train`` and ``launch`` share, below all three: the typed option
schema (``sparse_comm.schema``), so a library never imports the training driver above it."""
