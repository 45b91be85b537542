"""The Deep Compression file format: canonical Huffman, relative indices, exact round trips
and the storage report (sparse_train.huffman, sparse_train.codec, sparse_train.storage_report)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from sparse_comm.schema import ConfigError
from sparse_train import codec, huffman
from sparse_train.quantize import share_weights
from tests.test_quantize import pruned_model


def is_prefix_free(codes: np.ndarray, lengths: np.ndarray) -> bool:
    words = sorted(format(int(codes[s]), f"0{int(lengths[s])}b") for s in np.flatnonzero(lengths))
    return all(not b.startswith(a) for a, b in zip(words, words[1:]))


@pytest.mark.parametrize("alphabet, size, concentration", [
    (32, 20000, 0.3), (256, 5000, 1.0), (2, 100, 1.0), (1, 7, 1.0), (4096, 30000, 0.05)])
def test_huffman_decode_of_encode_is_the_identity_on_random_streams(alphabet, size,
                                                                     concentration):
    rng = np.random.default_rng(alphabet)
    stream = rng.choice(alphabet, size=size, p=rng.dirichlet([concentration] * alphabet))
    lengths = huffman.code_lengths(np.bincount(stream, minlength=alphabet))
    data, nbits = huffman.encode(stream, lengths)
    table = huffman.lengths_from_bytes(huffman.lengths_to_bytes(lengths))
    assert np.array_equal(huffman.decode(data, nbits, size, table), stream)
    assert nbits == int((lengths[stream]).astype(np.int64).sum())
    assert is_prefix_free(huffman.canonical_codes(lengths), lengths)
    # Huffman's cost is within one bit per symbol of the stream's entropy.
    p = np.bincount(stream) / size
    entropy = -(p[p > 0] * np.log2(p[p > 0])).sum()
    assert nbits / size <= max(entropy, 0) + 1


def test_huffman_lengths_are_capped_and_the_code_stays_complete():
    counts = np.array([int(1.6 ** i) + 1 for i in range(60)])  # Fibonacci-like: very deep
    assert huffman.code_lengths(counts, max_length=64).max() > 16  # uncapped, it is deeper
    lengths = huffman.code_lengths(counts, max_length=16)
    assert lengths.max() <= 16 and (lengths > 0).all()
    assert (2.0 ** -lengths.astype(float)).sum() == pytest.approx(1.0)  # Kraft: a full code
    assert is_prefix_free(huffman.canonical_codes(lengths), lengths)
    stream = np.random.default_rng(0).choice(60, size=1000)
    data, nbits = huffman.encode(stream, lengths)
    assert np.array_equal(huffman.decode(data, nbits, 1000, lengths), stream)


def test_huffman_rejects_a_truncated_stream():
    stream = np.arange(10) % 3
    lengths = huffman.code_lengths(np.bincount(stream))
    data, nbits = huffman.encode(stream, lengths)
    with pytest.raises(ValueError):
        huffman.decode(data, nbits - 3, 10, lengths)


@pytest.mark.parametrize("index_bits", [1, 2, 5, 8])
def test_relative_indices_bridge_long_gaps_with_fillers(index_bits):
    positions = np.array([0, 1, 2, 40, 41, 300, 301 + 2 ** index_bits - 1, 5000])
    stream = codec.relative_indices(positions, index_bits)
    assert stream.max() <= 2 ** index_bits - 1
    filler = 2 ** index_bits - 1
    assert (stream != filler).sum() == len(positions)
    # Each gap of g zeros costs g // filler fillers.
    gaps = np.diff(positions, prepend=-1) - 1
    assert (stream == filler).sum() == (gaps // filler).sum()
    assert np.array_equal(codec.absolute_positions(stream, index_bits), positions)
    assert len(codec.relative_indices(np.array([], dtype=np.int64), index_bits)) == 0


def shared_model():
    model, masks = pruned_model(keep=0.3)
    sharing = share_weights(model, bits=3, per_layer_bits={"0.*": 5}, masks=masks)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sharing.attach(optimizer)
    for _ in range(2):  # train the centroids a little so the weights are not the k-means ones
        nn.functional.cross_entropy(model(torch.randn(8, 1, 8, 8)),
                                    torch.randint(0, 10, (8,))).backward()
        optimizer.step()
    return model, masks, sharing


def test_decode_from_bytes_gives_back_the_trained_weights_exactly():
    model, _, sharing = shared_model()
    compressed = codec.encode(model, sharing=sharing, model_name="tiny",
                              input_shape=(1, 8, 8), meta={"note": "x"})
    again = codec.CompressedModel.from_bytes(compressed.to_bytes())
    state = again.decode()
    reference = model.state_dict()
    assert list(state) == list(reference)
    for name, tensor in reference.items():
        assert tensor.dtype == state[name].dtype and torch.equal(tensor, state[name]), name
    assert (again.model_name, again.input_shape, again.meta) == ("tiny", (1, 8, 8), {"note": "x"})
    fresh, _ = pruned_model(seed=5)
    fresh.load_state_dict(state)
    assert [t.kind for t in again.tensors] == ["shared", "dense", "shared", "dense"]
    assert again.tensors[0].fields["index_bits"] == 8 and again.tensors[2].fields["index_bits"] == 5


def test_pruned_layers_without_sharing_round_trip_as_values(tmp_path):
    model, masks = pruned_model(keep=0.2)
    for compressed in (codec.encode(model, masks=masks, index_bits=3), codec.encode(model)):
        assert [t.kind for t in compressed.tensors] == ["sparse", "dense", "sparse", "dense"]
        compressed.save(tmp_path / "m.dcz")
        state = codec.load(tmp_path / "m.dcz").decode()
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, state[name]), name


def test_fp16_codebooks_and_dense_tensors_decode_to_their_rounded_values():
    model, _, sharing = shared_model()
    compressed = codec.encode(model, sharing=sharing, codebook_dtype="float16",
                              dense_dtype="float16")
    state = codec.CompressedModel.from_bytes(compressed.to_bytes()).decode()
    for name, assignment in sharing.assignments.items():
        live = assignment >= 0
        expected = sharing.codebooks[name].half().float()[assignment[live].long()]
        assert torch.equal(state[name][live], expected) and (state[name][~live] == 0).all()
    assert torch.equal(state["0.bias"], model.state_dict()["0.bias"].half().float())


def test_encode_refuses_weights_that_left_their_codebook_or_mask():
    model, masks, sharing = shared_model()
    with torch.no_grad():
        model[0].weight[masks["0.weight"]] += 1e-3
    with pytest.raises(ValueError, match="0.weight does not hold its centroids"):
        codec.encode(model, sharing=sharing)
    model, masks = pruned_model()
    with pytest.raises(ValueError, match="nonzero weights where its mask prunes"):
        codec.encode(model, masks={"0.weight": torch.zeros_like(masks["0.weight"])})
    with pytest.raises(TypeError, match="sharing must be a WeightSharing .* got str"):
        codec.encode(model, sharing="x")


def test_from_bytes_rejects_what_is_not_a_dcz_file():
    model, _, sharing = shared_model()
    data = codec.encode(model, sharing=sharing).to_bytes()
    for bad in (b"PK\x03\x04" + data[4:], data[:-5], data[:3] + b"\x09" + data[4:]):
        with pytest.raises(ValueError):
            codec.CompressedModel.from_bytes(bad)


def test_storage_report_adds_up_to_the_file_and_follows_the_stages():
    model, masks, sharing = shared_model()
    compressed = codec.encode(model, sharing=sharing)
    report = compressed.storage_report()
    assert report.total("huffman") == len(compressed.to_bytes())
    assert report.header_bytes + sum(x.bytes["huffman"] for x in report.layers) \
        == report.file_bytes
    assert report.total("dense") == 4 * sum(p.numel() for p in model.parameters())
    conv = next(x for x in report.layers if x.name == "0.weight")
    live = int(masks["0.weight"].sum())
    entries = compressed.tensors[0].fields["entries"]
    assert conv.live == live
    assert conv.bytes["pruned"] == -(-(live * 32 + entries * 8) // 8)
    assert conv.bytes["shared"] == -(-(live * 5 + entries * 8) // 8) + 32 * 4
    assert report.ratio("pruned") < report.ratio("shared")
    text = report.markdown()
    assert "| 0.weight | shared |" in text and "Weight bits (P+Q+H)" in text
    assert f"| ratio |  |  |  | 1.0x | {report.ratio('pruned'):.1f}x" in text
    metrics = report.metrics("dc/")
    assert metrics["dc/huffman_bytes"] == report.file_bytes


@pytest.mark.parametrize("index_bits, key", [(0, "index_bits"), ({"0.*": 17}, "index_bits.0.*")])
def test_an_index_width_outside_1_to_16_is_a_config_error(index_bits, key):
    model, masks = pruned_model()
    with pytest.raises(ConfigError, match=f"config key '{re.escape(key)}': must be an int in"):
        codec.encode(model, masks=masks, index_bits=index_bits)


def test_a_mask_that_does_not_fit_its_tensor_is_a_config_error_naming_it():
    model, masks = pruned_model()
    masks["0.weight"] = torch.ones(3, 3, dtype=torch.bool)
    with pytest.raises(ConfigError, match=re.escape("config key 'masks.0.weight': shape (3, 3)")):
        codec.encode(model, masks=masks)
