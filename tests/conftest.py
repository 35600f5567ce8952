import os

import pytest

os.environ.setdefault("TOOLKIT_SCALE", "tiny")


@pytest.fixture(scope="session")
def experiment_cache(tmp_path_factory):
    """One TOOLKIT_CACHE for every test that runs an experiment at tiny scale: each tiny model,
    fine-tune and Fisher is trained once per session."""
    return tmp_path_factory.mktemp("experiment-cache")
