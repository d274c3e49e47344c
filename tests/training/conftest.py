"""Fixtures for the training tests."""

import pytest
from mofi_testdata import make_i2e


@pytest.fixture
def tiny_i2e(tmp_path):
    return make_i2e(tmp_path / "i2e")
