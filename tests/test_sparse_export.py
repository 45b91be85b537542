"""Export formats: exact N:M compression, torch CSR / COO / BSR, storage sizes."""
import pytest
import torch

import sparse_train
from sparse_train import masks
from sparse_train.formats import compress_nm, pack_bits, storage_bytes, unpack_bits
from tests.sparse_helpers import SCHEDULES, batches, mlp, one_thread, train_step  # noqa: F401


@pytest.mark.parametrize("bits", [1, 2, 3, 5])
def test_bit_packing_round_trips(bits):
    values = torch.randint(0, 2 ** bits, (37,))
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (37 * bits + 7) // 8
    assert unpack_bits(packed, bits, 37).equal(values)


@pytest.mark.parametrize("shape,n,m", [((8, 16), 2, 4), ((6, 8, 3, 3), 2, 4),
                                       ((4, 16), 1, 4), ((5, 16, 2), 3, 8)])
def test_nm_compressed_form_round_trips_exactly(shape, n, m):
    torch.manual_seed(0)
    w = torch.randn(shape)
    w = w * masks.nm_mask(w, n, m)
    w.view(-1)[:7] = 0.0  # some groups with fewer than n nonzeros
    packed = compress_nm(w, n, m)
    assert packed.values.shape[-1] == n
    assert packed.to_dense().equal(w)
    assert packed.nbytes == storage_bytes(w, n=n, m=m)["nm"]


def test_2_4_metadata_is_2_bits_per_kept_value():
    w = torch.randn(16, 64)
    packed = compress_nm(w * masks.nm_mask(w, 2, 4), 2, 4)
    assert packed.positions.numel() == 16 * 64 // 2 * 2 // 8


def test_compress_nm_rejects_non_compliant_weights():
    with pytest.raises(ValueError, match="more than 2 nonzeros"):
        compress_nm(torch.ones(4, 8), 2, 4)
    with pytest.raises(ValueError, match="not a multiple"):
        compress_nm(torch.zeros(4, 6), 2, 4)


def trained(method, steps=16, **extra):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = sparse_train.attach(model, opt, method=method, **{**SCHEDULES[method], **extra})
    for x, y in batches(steps):
        train_step(model, opt, x, y)
    return model, sp


def test_export_nm_from_sparsifier_round_trips_every_layer():
    model, sp = trained("nm")
    exported = sparse_train.export(sp, format="nm")
    assert set(exported) == set(sp.params)
    for name, packed in exported.items():
        assert packed.to_dense().equal(sp.params[name].detach())


@pytest.mark.parametrize("format", ["csr", "coo"])
@pytest.mark.parametrize("method", ["magnitude", "dns"])
def test_export_csr_coo_to_dense_equals_masked_weight(method, format):
    model, sp = trained(method)
    for name, t in sparse_train.export(sp, format=format).items():
        masked = sp.params[name].detach() * sp.masks[name]
        assert t.to_dense().reshape(masked.shape).equal(masked)
        nnz = t._nnz() if format == "coo" else t.values().numel()
        assert nnz == int((masked != 0).sum())


def test_export_bsr_to_dense_equals_masked_weight_and_stores_kept_blocks():
    model, sp = trained("block")
    exported = sparse_train.export(sp, format="bsr")
    assert set(exported) == {"0.weight", "2.weight"}  # 4.weight was left dense
    for name, t in exported.items():
        w = sp.params[name].detach()
        assert t.to_dense().equal(w)
        assert t.values().shape[1:] == (2, 4)
        assert t.values().shape[0] == w.numel() // 8 // 2  # half the blocks kept


def test_export_from_plain_model_reads_masks_off_the_nonzeros():
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    with torch.no_grad():
        model[0].weight.mul_(masks.nm_mask(model[0].weight, 2, 4))
    exported = sparse_train.export(model, format="nm")
    assert exported["0.weight"].to_dense().equal(model[0].weight.detach())
    with pytest.raises(ValueError, match="exporting 1.weight as nm: .* not a multiple of m"):
        sparse_train.export(torch.nn.Sequential(model[0], torch.nn.Linear(6, 2)), format="nm")


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(format="nm", n=3, m=2), ValueError, "1 <= n <= m, got n=3, m=2"),
    (dict(format="nm", n=0), ValueError, "1 <= n <= m, got n=0, m=4"),
    (dict(format="bsr", blocksize=(0, 0)), ValueError, "blocksize must be two integers >= 1"),
    (dict(format="bsr", blocksize=-1), ValueError, "blocksize must be two integers >= 1"),
])
def test_export_arguments_are_checked_in_one_line(kwargs, error, message):
    with pytest.raises(error, match=message):
        sparse_train.export(mlp(), **kwargs)
    with pytest.raises(TypeError, match="expected a model or a Sparsifier, got NoneType"):
        sparse_train.export(None)


def test_storage_bytes_per_format():
    w = torch.zeros(4, 8)
    w[0, :2] = 1.0
    w[2, 4:6] = 2.0
    sizes = storage_bytes(w, n=2, m=4, block=(2, 4), index_bytes=4)
    assert sizes == {
        "dense": 32 * 4,
        "coo": 4 * (4 + 8),
        "csr": 4 * (4 + 4) + 5 * 4,
        "bsr": 2 * (8 * 4 + 4) + 3 * 4,
        "ell": 4 * 2 * (4 + 4),
        "nm": 16 * 4 + 16 * 2 // 8,
    }
    assert storage_bytes(torch.ones(4, 8))["nm"] is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_semi_structured_export_without_gpu_raises_a_clear_error():
    model, sp = trained("nm")
    with pytest.raises(RuntimeError, match="compute capability >= 8.0"):
        sparse_train.export(sp, format="semi_structured")


@pytest.mark.skipif(not torch.cuda.is_available()
                    or torch.cuda.get_device_capability() < (8, 0),
                    reason="needs a CUDA GPU of compute capability >= 8.0")
def test_semi_structured_export_matches_the_masked_weight_on_gpu():
    w = torch.randn(64, 128)
    w = w * masks.nm_mask(w, 2, 4)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(w)
    exported = sparse_train.export(model, format="semi_structured")["0.weight"]
    assert exported.to_dense().cpu().equal(w.half())


def test_semi_structured_export_refuses_float32_which_torch_stores_as_1_2():
    """torch's float32 semi-structured format is 1:2; a 2:4 weight would lose entries."""
    model, sp = trained("nm")
    with pytest.raises(ValueError, match="float32.*1:2"):
        sparse_train.export(sp, format="semi_structured", dtype=torch.float32)
