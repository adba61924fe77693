"""T5's relative-position buckets equal Hugging Face `transformers`' (PyTorch, CPU).

Logit parity of whole models goes through the library's importer: tests/hf/test_t5.py.
"""

import numpy as np
import pytest

from t5x_lite.nn import layers

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def test_relative_position_bucket_matches_hf():
    relative = np.arange(-600, 600)
    for bidirectional in (True, False):
        for num_buckets, max_distance in ((32, 128), (8, 20), (64, 256)):
            expected = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
                torch.tensor(relative), bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
            ).numpy()
            ours = layers.relative_position_bucket(
                relative, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
            )
            np.testing.assert_array_equal(ours, expected)
