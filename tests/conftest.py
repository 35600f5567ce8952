import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests share small fixtures as plain modules
os.environ.setdefault("TOOLKIT_SCALE", "tiny")


@pytest.fixture(scope="session")
def experiment_cache(tmp_path_factory):
    """One TOOLKIT_CACHE for every test that runs an experiment at tiny scale: each tiny model,
    fine-tune and Fisher is trained once per session."""
    return tmp_path_factory.mktemp("experiment-cache")
