"""fusedmf.data: the CIFAR-10 binary reader on small files written here, and the synthetic batches."""

import os

import pytest
import torch

from fusedmf.data import (CIFAR10FormatError, RECORD_BYTES, load_cifar10, read_cifar10_batch, synthetic_cifar10,
                          synthetic_imagenet)
from fusedmf.data.cifar10 import normalize, write_cifar10_batch


def _records(n, seed):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g)
    return images, labels


def _write_raw(path, images, labels):
    # byte by byte, independent of write_cifar10_batch: label, then R (1024), G, B planes row-major
    with open(path, "wb") as f:
        for img, lab in zip(images, labels):
            f.write(bytes([int(lab)]))
            f.write(bytes(img.flatten().tolist()))


def _make_split(root, sizes=(3, 2, 4, 1, 2), test=5):
    data = {}
    for i, n in enumerate(sizes, 1):
        data[f"data_batch_{i}.bin"] = _records(n, i)
        _write_raw(os.path.join(root, f"data_batch_{i}.bin"), *data[f"data_batch_{i}.bin"])
    data["test_batch.bin"] = _records(test, 99)
    _write_raw(os.path.join(root, "test_batch.bin"), *data["test_batch.bin"])
    return data


def test_read_batch_layout(tmp_path):
    images, labels = _records(4, 0)
    _write_raw(tmp_path / "b.bin", images, labels)
    assert os.path.getsize(tmp_path / "b.bin") == 4 * RECORD_BYTES
    x, y = read_cifar10_batch(tmp_path / "b.bin")
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 32, 32) and y.dtype == torch.int64
    assert torch.equal(x, images) and torch.equal(y, labels)
    # CHW: byte 1 + 1024 of record 0 is the first green pixel
    raw = (tmp_path / "b.bin").read_bytes()
    assert raw[0] == labels[0] and raw[1 + 1024] == x[0, 1, 0, 0] and raw[1 + 32 + 1] == x[0, 0, 1, 1]


def test_load_train_and_test_splits(tmp_path):
    data = _make_split(tmp_path)
    x, y = load_cifar10(tmp_path, train=True)
    assert x.shape == (12, 3, 32, 32) and y.shape == (12,)
    exp_x = torch.cat([data[f"data_batch_{i}.bin"][0] for i in range(1, 6)])
    exp_y = torch.cat([data[f"data_batch_{i}.bin"][1] for i in range(1, 6)])
    assert torch.equal(x, exp_x) and torch.equal(y, exp_y)
    xt, yt = load_cifar10(tmp_path, train=False)
    assert torch.equal(xt, data["test_batch.bin"][0]) and torch.equal(yt, data["test_batch.bin"][1])
    # the parent directory of cifar-10-batches-bin works too
    sub = tmp_path / "parent" / "cifar-10-batches-bin"
    sub.mkdir(parents=True)
    _make_split(sub)
    assert load_cifar10(tmp_path / "parent", train=False)[0].shape == (5, 3, 32, 32)


def test_roundtrip_writer(tmp_path):
    images, labels = _records(3, 7)
    write_cifar10_batch(tmp_path / "w.bin", images, labels)
    x, y = read_cifar10_batch(tmp_path / "w.bin")
    assert torch.equal(x, images) and torch.equal(y, labels)


def test_missing_files_named(tmp_path):
    _make_split(tmp_path)
    os.remove(tmp_path / "data_batch_3.bin")
    os.remove(tmp_path / "data_batch_5.bin")
    with pytest.raises(CIFAR10FormatError, match="data_batch_3.bin, data_batch_5.bin"):
        load_cifar10(tmp_path, train=True)
    with pytest.raises(CIFAR10FormatError, match="missing"):
        load_cifar10(tmp_path / "nowhere", train=False)


def test_wrong_sizes_and_labels(tmp_path):
    (tmp_path / "trunc.bin").write_bytes(b"\x01" * (2 * RECORD_BYTES - 5))
    with pytest.raises(CIFAR10FormatError, match="whole number of CIFAR-10 records"):
        read_cifar10_batch(tmp_path / "trunc.bin")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(CIFAR10FormatError, match="whole number"):
        read_cifar10_batch(tmp_path / "empty.bin")
    images, labels = _records(2, 1)
    _write_raw(tmp_path / "ok.bin", images, labels)
    with pytest.raises(CIFAR10FormatError, match="2 records, expected 10000"):
        read_cifar10_batch(tmp_path / "ok.bin", expected_records=10000)
    bad = bytearray((tmp_path / "ok.bin").read_bytes())
    bad[RECORD_BYTES] = 10
    (tmp_path / "bad.bin").write_bytes(bytes(bad))
    with pytest.raises(CIFAR10FormatError, match="record 1 has label 10"):
        read_cifar10_batch(tmp_path / "bad.bin")


def test_normalize():
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = normalize(x, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert torch.allclose(out, torch.ones_like(out))


def test_synthetic_batches():
    x, y = synthetic_imagenet(2, "cpu", channels_last=True, image_size=64)
    assert x.shape == (2, 3, 64, 64) and x.is_contiguous(memory_format=torch.channels_last)
    assert y.shape == (2,) and int(y.min()) >= 0 and int(y.max()) < 1000 and x.std() > 0.5
    x2, _ = synthetic_imagenet(2, "cpu", image_size=64)
    assert torch.equal(x, x2) and x2.is_contiguous()                     # seeded: same data, same values
    xc, yc = synthetic_cifar10(5, dtype=torch.bfloat16)
    assert xc.shape == (5, 3, 32, 32) and xc.dtype == torch.bfloat16 and int(yc.max()) < 10
    with pytest.raises(ValueError):
        synthetic_cifar10(0)
