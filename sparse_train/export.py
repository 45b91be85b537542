"""Hand sparse weights to sparse kernels: one tensor per sparsified layer, in a chosen format.

Formats (values are layer weights as the forward uses them, i.e. ``W * mask``):

* ``"csr"``, ``"coo"``: torch sparse tensors of the ``[out, in * prod(kernel)]`` matrix.
* ``"bsr"``: torch BSR tensor of the same matrix with ``blocksize`` (default: the
  sparsifier's ``block`` option, else 4 x 4).
* ``"nm"``: :class:`sparse_train.formats.NMCompressed` (values plus packed positions),
  exact on any device.
* ``"semi_structured"``: ``torch.sparse.to_sparse_semi_structured`` of the 2:4 matrix, on
  a CUDA GPU of compute capability >= 8.0 (sparse tensor cores arrived with Ampere).

N:M exports use the N:M matrix (convolutions channels-last, ``[K, R*S*C]``; see
``sparse_train.masks``). From a Sparsifier the layers are its sparsified layers (those it
left dense are not exported); from a plain model, the weights of its Linear and Conv
layers, with masks read off as the nonzeros.
"""
from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import Tensor, nn

from .formats import compress_nm
from .masks import nm_compliant, nm_matrix
from .sparsifier import Sparsifier, select_weights, unwrap

Format = Literal["csr", "coo", "bsr", "nm", "semi_structured"]
SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16, torch.int8)
FORMATS: tuple[str, ...] = Format.__args__


def export(model_or_sparsifier: nn.Module | Sparsifier, format: Format = "csr", *,
           n: int | None = None, m: int | None = None,
           blocksize: tuple[int, int] | None = None,
           dtype: torch.dtype = torch.float16) -> dict[str, object]:
    """Sparse form of every sparsified weight, keyed by parameter name.

    ``n``, ``m`` and ``blocksize`` default to the sparsifier's options (2, 4 and 4 x 4
    for a plain model); ``dtype`` is the value type of ``"semi_structured"``, whose
    2:4 kernels take float16, bfloat16 or int8 (float32 is refused: torch's float32
    semi-structured layout is 1:2 and would drop half of a 2:4 weight's entries).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    source = model_or_sparsifier
    if isinstance(source, Sparsifier):
        weights = source.masked_weights()
        o = source.options
        n, m = o.n if n is None else n, o.m if m is None else m
        blocksize = tuple(o.block) if blocksize is None else blocksize
    elif isinstance(unwrap(source), nn.Module):
        weights = {name: p.detach() for name, p in select_weights(unwrap(source), []).items()}
        n, m = 2 if n is None else n, 4 if m is None else m
        blocksize = (4, 4) if blocksize is None else blocksize
    else:
        raise TypeError(f"sparse_train.export: expected a model or a Sparsifier, "
                        f"got {type(source).__name__}")
    if not (isinstance(n, int) and isinstance(m, int) and 1 <= n <= m):
        raise ValueError(f"n and m must be integers with 1 <= n <= m, got n={n!r}, m={m!r}")
    if not (isinstance(blocksize, (tuple, list)) and len(blocksize) == 2
            and all(isinstance(b, int) and b >= 1 for b in blocksize)):
        raise ValueError(f"blocksize must be two integers >= 1, got {blocksize!r}")
    convert = {
        "csr": lambda w: _matrix(w).to_sparse_csr(),
        "coo": lambda w: _matrix(w).to_sparse_coo(),
        "bsr": lambda w: _matrix(w).to_sparse_bsr(tuple(blocksize)),
        "nm": lambda w: compress_nm(w, n, m),
        "semi_structured": lambda w: to_semi_structured(w, dtype),
    }[format]
    out = {}
    for name, w in weights.items():
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Sparse .* tensor support is in beta")
                out[name] = convert(w)
        except (ValueError, RuntimeError) as err:
            kind = ValueError if isinstance(err, ValueError) else RuntimeError
            raise kind(f"exporting {name} as {format}: {err}") from err
    return out


def _matrix(weight: Tensor) -> Tensor:
    return weight.reshape(weight.shape[0], -1)


def to_semi_structured(weight: Tensor, dtype: torch.dtype = torch.float16):
    """2:4 weight to ``torch.sparse.SparseSemiStructuredTensor`` on the current CUDA GPU.

    Raises ValueError if the weight is not 2:4 and RuntimeError if there is no CUDA GPU
    of compute capability >= 8.0. torch adds its own shape limits (at the time of
    writing, rows and columns multiples of 32 / 64 depending on dtype) and reports them.
    """
    if dtype not in SEMI_STRUCTURED_DTYPES:
        # torch's float32 semi-structured layout is 1:2, not 2:4: a 2:4 weight loses entries
        # (350 of 2048 nonzeros in a test), silently.
        raise ValueError(f"semi-structured export takes float16, bfloat16 or int8 values, "
                         f"got {dtype} (torch stores float32 as 1:2, dropping 2:4 entries)")
    if not nm_compliant(weight, 2, 4):
        raise ValueError("semi-structured export needs a 2:4-sparse weight")
    if not torch.cuda.is_available():
        raise RuntimeError("semi-structured (2:4) export needs a CUDA GPU of compute "
                           "capability >= 8.0; torch sees no CUDA device")
    capability = torch.cuda.get_device_capability()
    if capability < (8, 0):
        raise RuntimeError("semi-structured (2:4) export needs a CUDA GPU of compute "
                           f"capability >= 8.0; this one is {capability[0]}.{capability[1]}")
    matrix = nm_matrix(weight.detach()).to(device="cuda", dtype=dtype).contiguous()
    return torch.sparse.to_sparse_semi_structured(matrix)
