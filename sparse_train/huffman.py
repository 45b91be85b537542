"""Canonical Huffman coding of streams of small non-negative integers, in numpy.

Deep Compression (Han, Mao & Dally 2016, section 4) Huffman-codes two streams per layer:
the codebook indices of the kept weights and the relative sparse indices. Both are
biased (weights cluster around two peaks, index differences are mostly small), which a
Huffman code turns into a 20-30% saving in the paper.

A canonical code is fixed by its code lengths alone: codes are handed out in order of
(length, symbol), each one the previous plus one, shifted left when the length grows. So
a stream's table is one length per symbol and nothing else. Lengths are capped at
``MAX_LENGTH`` bits (the counts are flattened until the code fits, which costs nothing
on the streams met here) so that decoding is one table lookup per symbol. Alphabets hold
at most ``2 ** MAX_LENGTH`` symbols, which any 16-bit codebook or index width fits.
"""
from __future__ import annotations

import heapq

import numpy as np

MAX_LENGTH = 16


def code_lengths(counts: np.ndarray, max_length: int = MAX_LENGTH) -> np.ndarray:
    """Huffman code length (uint8) of each symbol given its count; 0 where the count is 0.

    A stream of one distinct symbol gets a 1-bit code, so every symbol costs a bit.
    """
    counts = np.asarray(counts, dtype=np.int64)
    lengths = np.zeros(len(counts), dtype=np.uint8)
    used = np.flatnonzero(counts)
    assert len(used) <= 2 ** max_length, f"{len(used)} symbols do not fit {max_length}-bit codes"
    if len(used) == 1:
        lengths[used] = 1
    elif len(used) > 1:
        weights = counts[used]
        depths = _tree_depths(weights)
        while depths.max() > max_length:
            # Halving the counts (rounding up, so none reaches 0) flattens the tree; at
            # worst every count is 1 and the tree is balanced, ceil(log2(n)) deep.
            weights = (weights + 1) // 2
            depths = _tree_depths(weights)
        lengths[used] = depths
    return lengths


def _tree_depths(weights: np.ndarray) -> np.ndarray:
    """Depth of each leaf of the Huffman tree of ``weights`` (at least two of them)."""
    n = len(weights)
    heap = [(int(w), i) for i, w in enumerate(weights)]  # ties broken by node id: deterministic
    heapq.heapify(heap)
    parent = np.zeros(2 * n - 1, dtype=np.int64)
    node = n
    while len(heap) > 1:
        w1, a = heapq.heappop(heap)
        w2, b = heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (w1 + w2, node))
        node += 1
    depth = np.zeros(2 * n - 1, dtype=np.int64)
    for i in range(2 * n - 3, -1, -1):  # parents have larger ids than their children
        depth[i] = depth[parent[i]] + 1
    return depth[:n]


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """The canonical code (int64, read MSB first over its length) of every symbol."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(len(lengths), dtype=np.int64)
    used = np.flatnonzero(lengths)
    order = used[np.lexsort((used, lengths[used]))]
    code, previous = 0, 0
    for symbol in order:
        code <<= int(lengths[symbol]) - previous
        codes[symbol] = code
        code += 1
        previous = int(lengths[symbol])
    return codes


def encode(symbols: np.ndarray, lengths: np.ndarray) -> tuple[bytes, int]:
    """``symbols`` coded with the canonical code of ``lengths``: the packed bytes (MSB
    first, zero-padded to a byte) and the number of bits used."""
    symbols = np.asarray(symbols, dtype=np.int64)
    if symbols.size == 0:
        return b"", 0
    codes = canonical_codes(lengths)
    size = np.asarray(lengths, dtype=np.int64)[symbols]
    assert size.min() > 0, "a symbol without a code"
    value = codes[symbols]
    total = int(size.sum())
    owner = np.repeat(np.arange(len(symbols)), size)
    offset = np.arange(total) - np.repeat(np.cumsum(size) - size, size)
    bits = (value[owner] >> (size[owner] - 1 - offset)) & 1
    return np.packbits(bits.astype(np.uint8)).tobytes(), total


def decode(data: bytes, nbits: int, count: int, lengths: np.ndarray) -> np.ndarray:
    """The ``count`` symbols (int64) coded in the first ``nbits`` bits of ``data``.

    Raises ValueError if the bits do not hold exactly ``count`` codes of this table.
    """
    if count == 0:
        if nbits:
            raise ValueError(f"{nbits} bits left over after 0 symbols")
        return np.zeros(0, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    width = int(lengths.max())
    if width == 0:
        raise ValueError("empty code table for a non-empty stream")
    codes = canonical_codes(lengths)
    # Every `width`-bit window that starts with a symbol's code maps to that symbol.
    table_symbol = np.zeros(1 << width, dtype=np.int64)
    table_length = np.zeros(1 << width, dtype=np.int64)
    for symbol in np.flatnonzero(lengths):
        shift = width - int(lengths[symbol])
        start = int(codes[symbol]) << shift
        table_symbol[start:start + (1 << shift)] = symbol
        table_length[start:start + (1 << shift)] = lengths[symbol]
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    if len(bits) < nbits:
        raise ValueError(f"stream holds {len(bits)} bits, header says {nbits}")
    bits = np.concatenate([bits[:nbits], np.zeros(width, dtype=np.uint8)]).astype(np.int64)
    windows = np.zeros(nbits + 1, dtype=np.int64)
    for j in range(width):
        windows = (windows << 1) | bits[j:j + nbits + 1]
    windows, symbols_at, sizes = windows.tolist(), table_symbol.tolist(), table_length.tolist()
    out = [0] * count
    pos = 0
    for i in range(count):
        if pos >= nbits:
            raise ValueError(f"stream ends after {i} of {count} symbols")
        window = windows[pos]
        if sizes[window] == 0:
            raise ValueError(f"no code matches the bits at offset {pos}")
        out[i] = symbols_at[window]
        pos += sizes[window]
    if pos != nbits:
        raise ValueError(f"{count} symbols end at bit {pos}, the stream has {nbits}")
    return np.asarray(out, dtype=np.int64)


def lengths_to_bytes(lengths: np.ndarray) -> bytes:
    """A code table as bytes: one length per symbol up to the last one used."""
    lengths = np.asarray(lengths, dtype=np.uint8)
    used = np.flatnonzero(lengths)
    return lengths[:used[-1] + 1].tobytes() if len(used) else b""


def lengths_from_bytes(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).astype(np.int64)
