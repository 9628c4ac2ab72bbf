import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(20261128)


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M, loaded once for the whole test session (about 15-25 s)."""
    from specert.models import load_model

    return load_model("smollm2-135m")
