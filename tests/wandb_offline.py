"""Read back what an offline wandb run recorded, straight from its ``run-*.wandb`` file.

The file is wandb's record log: a 7-byte header (":W&B", magic 0xBEE1, version), then
32 KiB blocks of chunks, each with a 7-byte header (crc32 uint32, length uint16, type
uint8: 1 full, 2 first, 3 middle, 4 last) followed by a slice of a serialized
``wandb_internal_pb2.Record``. Block tails shorter than a chunk header are zero padding.
"""
from __future__ import annotations

import glob
import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
HEADER = 7


def _records(path: Path):
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb record log"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if length == 0 and kind == 0:
            pos += room
            continue
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def read_offline_run(wandb_dir: str | Path) -> dict:
    """History rows, final summary, config and metric definitions of the run under wandb_dir."""
    files = sorted(glob.glob(str(Path(wandb_dir) / "**" / "offline-run-*" / "run-*.wandb"),
                             recursive=True))
    assert files, f"no offline wandb run under {wandb_dir}"
    out = {"history": [], "summary": {}, "config": {}, "metrics": {}}
    for record in _records(Path(files[-1])):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            out["history"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                   for item in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                out["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind in ("config", "run"):
            updates = record.config.update if kind == "config" else record.run.config.update
            for item in updates:
                out["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "metric":
            out["metrics"][record.metric.name or record.metric.glob_name] = record.metric.step_metric
    return out
