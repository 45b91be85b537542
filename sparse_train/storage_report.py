"""Bytes of an encoded model after each Deep Compression stage, per layer and in total.

Stages, for each sparse layer (n weights, ``live`` of them kept, ``entries`` index
entries counting fillers, b-bit values, i-bit indices):

* dense: n values in their dtype (fp32: 4n bytes);
* pruned: the live values in their dtype plus an i-bit relative index per entry;
* + weight sharing: a ``bits``-bit codebook index per live weight, the i-bit indices, and
  the codebook (fixed widths, no entropy coding); a layer pruned but not shared stays
  as pruned;
* + Huffman: what the file holds for the layer (both coded streams, their code tables,
  the codebook).

Other state_dict entries (biases, buffers) cost their dense bytes at every stage (their
stored bytes in the file). The file total adds the header, so it is the file's size. The
second table follows the layout of the paper's Tables 2 and 3 (Han, Mao & Dally 2016):
bits per live weight before and after Huffman coding, fillers counted in the index bits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .codec import CompressedModel, EncodedTensor

STAGES = ("dense", "pruned", "shared", "huffman")
STAGE_TITLES = {"dense": "dense fp32", "pruned": "pruned (sparse)",
                "shared": "+ weight sharing", "huffman": "+ Huffman (file)"}


@dataclass(frozen=True)
class LayerStorage:
    name: str
    kind: str
    numel: int
    live: int
    bytes: dict[str, int]  # by stage
    bits: int | None = None  # codebook bits (shared layers)
    index_bits: int | None = None
    value_bits_coded: float | None = None  # per live weight, after Huffman
    index_bits_coded: float | None = None


def _layer(t: EncodedTensor) -> LayerStorage:
    itemsize = getattr(torch, t.dtype).itemsize
    dense = t.numel * itemsize
    if t.kind == "dense":
        return LayerStorage(t.name, t.kind, t.numel, t.numel,
                            {"dense": dense, "pruned": dense, "shared": dense,
                             "huffman": t.nbytes})
    f = t.fields
    live, entries, index_bits = f["live"], f["entries"], f["index_bits"]
    pruned = math.ceil((live * itemsize * 8 + entries * index_bits) / 8)
    if t.kind == "shared":
        shared = math.ceil((live * f["bits"] + entries * index_bits) / 8) \
            + len(t.blobs["codebook"])
        value_coded = f["value_nbits"] / live if live else 0.0
    else:
        shared, value_coded = pruned, float(itemsize * 8)
    return LayerStorage(t.name, t.kind, t.numel, live,
                        {"dense": dense, "pruned": pruned, "shared": shared,
                         "huffman": t.nbytes},
                        bits=f.get("bits", itemsize * 8), index_bits=index_bits,
                        value_bits_coded=value_coded,
                        index_bits_coded=f["index_nbits"] / live if live else 0.0)


@dataclass(frozen=True)
class StorageReport:
    layers: list[LayerStorage]
    file_bytes: int

    @property
    def header_bytes(self) -> int:
        return self.file_bytes - sum(layer.bytes["huffman"] for layer in self.layers)

    def total(self, stage: str) -> int:
        if stage == "huffman":
            return self.file_bytes
        return sum(layer.bytes[stage] for layer in self.layers)

    def ratio(self, stage: str) -> float:
        return self.total("dense") / self.total(stage)

    def metrics(self, prefix: str = "storage/") -> dict[str, Any]:
        """Flat numbers for wandb: total bytes and ratio per stage, and per layer."""
        out = {f"{prefix}{stage}_bytes": self.total(stage) for stage in STAGES}
        out.update({f"{prefix}{stage}_ratio": self.ratio(stage) for stage in STAGES[1:]})
        for layer in self.layers:
            for stage in STAGES:
                out[f"{prefix}{layer.name}/{stage}_bytes"] = layer.bytes[stage]
        return out

    def rows(self) -> tuple[list[str], list[list[Any]]]:
        """The stage table as columns and rows (for a wandb Table)."""
        columns = ["layer", "kind", "weights", "kept"] + [STAGE_TITLES[s] for s in STAGES]
        rows = [[layer.name, layer.kind, layer.numel, layer.live,
                 *(layer.bytes[s] for s in STAGES)] for layer in self.layers]
        rows.append(["(file header)", "", 0, 0, 0, 0, 0, self.header_bytes])
        rows.append(["total", "", sum(x.numel for x in self.layers),
                     sum(x.live for x in self.layers), *(self.total(s) for s in STAGES)])
        return columns, rows

    def markdown(self) -> str:
        columns, rows = self.rows()
        lines = ["Bytes after each stage:", "", _md_row(columns),
                 _md_row(["---"] * len(columns))]
        lines += [_md_row(row) for row in rows]
        lines.append(_md_row(["ratio", "", "", "", *(f"{self.ratio(s):.1f}x" for s in STAGES)]))
        lines += ["", "In the layout of the paper's Tables 2 and 3 (bits per kept weight):",
                  "", paper_table(self)]
        return "\n".join(lines) + "\n"


def paper_table(report: StorageReport) -> str:
    """Sparse layers as in Han et al.'s Tables 2 and 3: weights kept (P), weight and index
    bits before (P+Q) and after (P+Q+H) Huffman coding, and the size as a share of dense."""
    header = ["Layer", "#Weights", "Weights% (P)", "Weight bits (P+Q)",
              "Weight bits (P+Q+H)", "Index bits (P+Q)", "Index bits (P+Q+H)",
              "Compress rate (P+Q)", "Compress rate (P+Q+H)"]
    lines = [_md_row(header), _md_row(["---"] * len(header))]
    sparse = [x for x in report.layers if x.kind != "dense"]
    for x in sparse:
        lines.append(_md_row([x.name, _count(x.numel), f"{100 * x.live / x.numel:.1f}%",
                              x.bits, f"{x.value_bits_coded:.1f}", x.index_bits,
                              f"{x.index_bits_coded:.1f}",
                              f"{100 * x.bytes['shared'] / x.bytes['dense']:.2f}%",
                              f"{100 * x.bytes['huffman'] / x.bytes['dense']:.2f}%"]))
    if sparse:
        numel, live = sum(x.numel for x in sparse), sum(x.live for x in sparse)
        dense = sum(x.bytes["dense"] for x in sparse)
        shared = sum(x.bytes["shared"] for x in sparse)
        coded = sum(x.bytes["huffman"] for x in sparse)

        def mean(attr):
            return sum(getattr(x, attr) * x.live for x in sparse) / max(1, live)
        lines.append(_md_row([
            "Total", _count(numel), f"{100 * live / numel:.1f}% ({numel / max(1, live):.0f}x)",
            f"{mean('bits'):.1f}", f"{mean('value_bits_coded'):.1f}",
            f"{mean('index_bits'):.1f}", f"{mean('index_bits_coded'):.1f}",
            f"{100 * shared / dense:.2f}% ({dense / shared:.0f}x)",
            f"{100 * coded / dense:.2f}% ({dense / coded:.0f}x)"]))
    return "\n".join(lines)


def storage_report(compressed: CompressedModel) -> StorageReport:
    """The stage-by-stage bytes of ``compressed`` (see the module docstring)."""
    return StorageReport([_layer(t) for t in compressed.tensors],
                         len(compressed.to_bytes()))


def _count(n: int) -> str:
    return f"{n / 1000:.1f}K" if n >= 1000 else str(n)


def _md_row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"
