"""What ``dgc``, ``sparse_train`` and ``launch`` share, below all three: the typed option
schema (``sparse_comm.schema``), keyed random draws (``sparse_comm.draws``) and atomic file
replacement (``sparse_comm.atomic``), so a library never imports the training driver above it."""
