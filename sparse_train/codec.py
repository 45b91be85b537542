"""Deep Compression's storage format: sparse layers as relative indices plus codebook
indices, both Huffman-coded, in one file that decodes to the exact weights.

    compressed = sparse_train.codec.encode(model, sharing=sharing, model_name="lenet300",
                                           input_shape=(1, 28, 28))
    compressed.save("model.dcz")
    print(compressed.storage_report().markdown())
    state = sparse_train.codec.load("model.dcz").decode()  # a state_dict for the same model

Each sparsified weight is flattened row-major (``weight.reshape(-1)``: CSR order for a
Linear layer) and its live entries stored in order, as in Han, Mao & Dally (2016,
section 2 and figure 2):

* the index stream: for each live weight, the number of zeros since the previous one, in
  ``index_bits`` bits (the paper uses 8 for conv layers and 5 for fc layers, the
  defaults here). A gap too long for the width is bridged by filler entries. The largest
  value, ``2 ** index_bits - 1``, is reserved for a filler, which skips that many
  positions and holds no weight. (The paper's filler holds a zero weight instead; one
  without a value needs no zero in the codebook and no symbol in the value stream.)
* the value stream: for a shared layer (``sparse_train.quantize``), the codebook index of
  each live weight, plus the codebook in fp32 (or fp16); for a layer that is pruned but
  not shared, the values themselves in their dtype.

Both integer streams are Huffman-coded (``sparse_train.huffman``), one canonical code per
stream and layer. Every other entry of the model's state_dict (biases, unshared weights,
buffers) is stored whole, in its dtype (or fp16 with ``dense_dtype``).

File: ``b"DCZ"``, a format version byte, the header length (uint32, little-endian), the
header, then the blobs in header order. The header is zlib-compressed JSON: the model's
name and input shape (for ``launch.models.build_model``; this library does not know the
models), free-form ``meta``, and per tensor its kind, shape, dtype, widths, counts and
blob sizes.
"""
from __future__ import annotations

import fnmatch
import json
import os
import struct
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from sparse_comm.atomic import replace_atomic
from sparse_comm.schema import ConfigError, require

from . import huffman
from .quantize import MAX_BITS, WeightSharing
from .sparsifier import select_weights, unwrap
from .storage_report import StorageReport, storage_report

MAGIC, VERSION = b"DCZ", 1
PAPER_INDEX_BITS = {"conv": 8, "fc": 5}
Kind = Literal["shared", "sparse", "dense"]
FloatName = Literal["float32", "float16"]


def relative_indices(positions: np.ndarray, index_bits: int) -> np.ndarray:
    """The index stream of the sorted flat ``positions`` of the live weights: zeros skipped
    before each, with a filler (``2 ** index_bits - 1``) per full gap the width cannot hold."""
    filler = 2 ** index_bits - 1
    positions = np.asarray(positions, dtype=np.int64)
    gaps = np.diff(positions, prepend=-1) - 1
    fillers, rest = np.divmod(gaps, filler)
    stream = np.full(int(fillers.sum()) + len(positions), filler, dtype=np.int64)
    stream[np.cumsum(fillers + 1) - 1] = rest
    return stream


def absolute_positions(stream: np.ndarray, index_bits: int) -> np.ndarray:
    """Inverse of :func:`relative_indices`."""
    filler = 2 ** index_bits - 1
    stream = np.asarray(stream, dtype=np.int64)
    live = stream != filler
    advance = np.where(live, stream + 1, filler)  # a live entry also moves past itself
    return np.cumsum(advance)[live] - 1


@dataclass
class EncodedTensor:
    """One state_dict entry as stored: ``fields`` are the header's numbers for it (widths,
    counts, bit lengths), ``blobs`` its bytes, in file order."""

    name: str
    kind: Kind
    shape: tuple[int, ...]
    dtype: str
    fields: dict[str, Any]
    blobs: dict[str, bytes]

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.blobs.values())

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def decode(self) -> Tensor:
        dtype = getattr(torch, self.dtype)
        if self.kind == "dense":
            return _from_bytes(self.blobs["data"], self.fields["stored_dtype"]) \
                .to(dtype).reshape(self.shape)
        f = self.fields
        stream = huffman.decode(self.blobs["index"], f["index_nbits"], f["entries"],
                                huffman.lengths_from_bytes(self.blobs["index_table"]))
        positions = absolute_positions(stream, f["index_bits"])
        if len(positions) != f["live"] or (len(positions) and positions[-1] >= self.numel):
            raise ValueError(f"{self.name}: index stream does not fit the weight")
        if self.kind == "shared":
            codebook = _from_bytes(self.blobs["codebook"], f["codebook_dtype"]).to(dtype)
            clusters = huffman.decode(self.blobs["values"], f["value_nbits"], f["live"],
                                      huffman.lengths_from_bytes(self.blobs["value_table"]))
            values = codebook[torch.from_numpy(clusters)]
        else:
            values = _from_bytes(self.blobs["values"], self.dtype)
        flat = torch.zeros(self.numel, dtype=dtype)
        flat[torch.from_numpy(positions)] = values
        return flat.reshape(self.shape)


@dataclass
class CompressedModel:
    """An encoded model: its tensors in state_dict order, plus what names the model."""

    tensors: list[EncodedTensor]
    model_name: str | None = None
    input_shape: tuple[int, ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def decode(self) -> OrderedDict[str, Tensor]:
        """The state_dict, exact: shared weights are their fp32 centroids (fp16 ones if
        the codebooks were stored in fp16), the rest as stored."""
        return OrderedDict((t.name, t.decode()) for t in self.tensors)

    def header(self) -> dict[str, Any]:
        return {"model": self.model_name,
                "input_shape": list(self.input_shape) if self.input_shape else None,
                "meta": self.meta,
                "tensors": [{"name": t.name, "kind": t.kind, "shape": list(t.shape),
                             "dtype": t.dtype, **t.fields,
                             "blobs": [[key, len(blob)] for key, blob in t.blobs.items()]}
                            for t in self.tensors]}

    def to_bytes(self) -> bytes:
        header = zlib.compress(json.dumps(self.header(), separators=(",", ":")).encode(), 9)
        return b"".join([MAGIC, bytes([VERSION]), struct.pack("<I", len(header)), header,
                         *(blob for t in self.tensors for blob in t.blobs.values())])

    @classmethod
    def from_bytes(cls, data: bytes) -> CompressedModel:
        if data[:3] != MAGIC or len(data) < 8:
            raise ValueError("not a Deep Compression file (no DCZ header)")
        if data[3] != VERSION:
            raise ValueError(f"DCZ format version {data[3]}, this reader knows {VERSION}")
        (size,) = struct.unpack("<I", data[4:8])
        try:
            header = json.loads(zlib.decompress(data[8:8 + size]))
        except (zlib.error, ValueError) as err:
            raise ValueError(f"corrupt DCZ header: {err}") from None
        pos, tensors = 8 + size, []
        for spec in header["tensors"]:
            spec = dict(spec)
            blobs = {}
            for key, length in spec.pop("blobs"):
                blobs[key] = data[pos:pos + length]
                pos += length
            name, kind, shape, dtype = (spec.pop(k) for k in ("name", "kind", "shape", "dtype"))
            tensors.append(EncodedTensor(name, kind, tuple(shape), dtype, spec, blobs))
        if pos != len(data):
            raise ValueError(f"DCZ file is {len(data)} bytes, its header accounts for {pos}")
        shape = header["input_shape"]
        return cls(tensors, header["model"], tuple(shape) if shape else None, header["meta"])

    def save(self, path: str | os.PathLike) -> int:
        """Write the file atomically (a reader sees the old file or the new one); returns
        its size in bytes."""
        data = self.to_bytes()
        replace_atomic(path, lambda f: f.write(data))
        return len(data)

    def storage_report(self) -> StorageReport:
        return storage_report(self)


def load(path: str | os.PathLike) -> CompressedModel:
    """Read a file written by :meth:`CompressedModel.save`. Raises ValueError for a file
    that is not one."""
    return CompressedModel.from_bytes(Path(path).read_bytes())


def encode(model: nn.Module, sharing: WeightSharing | None = None,
           masks: Mapping[str, Tensor] | None = None, *,
           index_bits: int | Mapping[str, int] | None = None,
           codebook_dtype: FloatName = "float32", dense_dtype: FloatName | None = None,
           model_name: str | None = None, input_shape: tuple[int, ...] | None = None,
           meta: Mapping[str, Any] | None = None) -> CompressedModel:
    """Encode ``model``'s state_dict (plain or DDP model).

    Sparse layers are those of ``sharing`` (stored as codebook indices) and the keys of
    ``masks`` (True = live) that are not shared (stored as values); with neither, the
    weights of every Linear and Conv layer, their nonzeros live. ``index_bits`` is the
    index width: one int, or a mapping of parameter names or glob patterns to ints, with
    the paper's 8 bits for conv weights (ndim > 2) and 5 for the rest where unlisted.
    ``model_name``, ``input_shape`` and ``meta`` (JSON-able) go into the header.

    Raises ValueError if a shared weight does not hold its centroids (train with the
    sharing attached, or call ``sharing.write_()``) or a pruned weight is nonzero, and
    TypeError if ``sharing`` is not a WeightSharing.
    """
    if sharing is not None and not isinstance(sharing, WeightSharing):
        raise TypeError(f"encode: sharing must be a WeightSharing (sparse_train.quantize."
                        f"share_weights) or None, got {type(sharing).__name__}")
    require(codebook_dtype in ("float32", "float16"), "codebook_dtype",
            f"must be float32 or float16, got {codebook_dtype!r}")
    require(dense_dtype in (None, "float32", "float16"), "dense_dtype",
            f"must be float32, float16 or null, got {dense_dtype!r}")
    module = unwrap(model)
    shared = dict(sharing.assignments) if sharing is not None else {}
    live = {name: a >= 0 for name, a in shared.items()}
    if masks is not None:
        live.update({name: m for name, m in masks.items() if name not in shared})
    elif sharing is None:
        live = {name: p.detach() != 0 for name, p in select_weights(module, []).items()}
    state = module.state_dict()
    unknown = sorted(set(live) - set(state))
    if unknown:
        raise ConfigError("masks", f"no state_dict entry named {', '.join(unknown)}")
    for name, mask in live.items():
        if mask.numel() != state[name].numel():
            raise ConfigError(f"masks.{name}", f"shape {tuple(mask.shape)} does not fit the "
                                               f"tensor's {tuple(state[name].shape)}")
    tensors = []
    for name, value in state.items():
        value = value.detach().cpu()
        if name not in live:
            tensors.append(_encode_dense(name, value, dense_dtype))
            continue
        bits = _index_bits(name, value, index_bits)
        mask = live[name].detach().cpu().to(torch.bool).reshape(value.shape)
        if name in shared:
            codebook = sharing.codebooks[name].detach().cpu()
            assignment = shared[name].cpu()
            tied = torch.where(mask, codebook[assignment.clamp(min=0).long()], 0).to(value.dtype)
            if not torch.equal(tied, value):
                raise ValueError(f"{name} does not hold its centroids: train with the "
                                 f"sharing attached or call sharing.write_() first")
            tensors.append(_encode_sparse(name, value, mask, bits, codebook,
                                          assignment[mask].long(), codebook_dtype))
        else:
            if bool((value[~mask] != 0).any()):
                raise ValueError(f"{name} has nonzero weights where its mask prunes")
            tensors.append(_encode_sparse(name, value, mask, bits))
    return CompressedModel(tensors, model_name,
                           tuple(int(d) for d in input_shape) if input_shape else None,
                           dict(meta or {}))


def _index_bits(name: str, weight: Tensor, index_bits: int | Mapping[str, int] | None) -> int:
    if isinstance(index_bits, int):
        bits, key = index_bits, "index_bits"
    else:
        table = dict(index_bits or {})
        keys = [k for k in table if k == name] or \
               [k for k in table if fnmatch.fnmatchcase(name, k)]
        if not keys:
            return PAPER_INDEX_BITS["conv" if weight.dim() > 2 else "fc"]
        bits, key = table[keys[0]], f"index_bits.{keys[0]}"
    require(isinstance(bits, int) and 1 <= bits <= MAX_BITS, key,
            f"must be an int in [1, {MAX_BITS}], got {bits!r}")
    return bits


def _encode_sparse(name: str, weight: Tensor, mask: Tensor, index_bits: int,
                   codebook: Tensor | None = None, clusters: Tensor | None = None,
                   codebook_dtype: FloatName = "float32") -> EncodedTensor:
    positions = np.flatnonzero(mask.reshape(-1).numpy())
    stream = relative_indices(positions, index_bits)
    fields = {"index_bits": index_bits, "live": len(positions), "entries": len(stream)}
    blobs = {}
    blobs["index_table"], blobs["index"], fields["index_nbits"] = \
        _huffman(stream, 2 ** index_bits)
    if codebook is None:
        blobs["values"] = _to_bytes(weight.reshape(-1)[torch.from_numpy(positions)])
        kind = "sparse"
    else:
        fields.update(bits=int(np.log2(len(codebook))), codebook_dtype=codebook_dtype)
        blobs["codebook"] = _to_bytes(codebook.to(getattr(torch, codebook_dtype)))
        blobs["value_table"], blobs["values"], fields["value_nbits"] = \
            _huffman(clusters.numpy(), len(codebook))
        kind = "shared"
    return EncodedTensor(name, kind, tuple(weight.shape), _dtype_name(weight.dtype),
                         fields, blobs)


def _encode_dense(name: str, value: Tensor, dense_dtype: FloatName | None) -> EncodedTensor:
    stored = value.to(getattr(torch, dense_dtype)) \
        if dense_dtype and value.is_floating_point() else value
    return EncodedTensor(name, "dense", tuple(value.shape), _dtype_name(value.dtype),
                         {"stored_dtype": _dtype_name(stored.dtype)}, {"data": _to_bytes(stored)})


def _huffman(stream: np.ndarray, alphabet: int) -> tuple[bytes, bytes, int]:
    """(code table, coded stream, its length in bits) of one integer stream."""
    lengths = huffman.code_lengths(np.bincount(stream, minlength=alphabet))
    data, nbits = huffman.encode(stream, lengths)
    return huffman.lengths_to_bytes(lengths), data, nbits


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _to_bytes(t: Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _from_bytes(data: bytes, dtype_name: str) -> Tensor:
    dtype = getattr(torch, dtype_name)
    if not data:
        return torch.zeros(0, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype)
