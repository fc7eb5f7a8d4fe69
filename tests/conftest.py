"""Shared pytest fixtures."""

import jax
import pytest


@pytest.fixture
def x64():
    """Run the test with 64-bit floats enabled (for exact identities)."""
    with jax.enable_x64(True):
        yield
