import numpy as np
import pytest

from cosed.metrics import clip_i, clip_t


def test_clip_t_is_mean_scaled_cosine_of_matching_pairs():
    images = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    texts = np.array([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8]])
    assert clip_t(images, texts) == pytest.approx(100 * (1.0 + 0.0 + 1.0) / 3)


def test_clip_i_is_mean_over_pairs_i_less_than_j():
    images = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    assert clip_i(images) == pytest.approx(100 * (0.0 + 0.6 + 0.8) / 3)
    assert clip_i(images[:1]) is None
