"""Test setup: 8 simulated CPU devices for sharding tests, and the real-data fixture."""

import os

# Must be set before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from jaxlm.paths import DATA_DIR_ENV, MissingDataError, data_dir  # noqa: E402


def _data_required() -> bool:
    return bool(os.environ.get("JAXLM_REQUIRE_DATA") or os.environ.get("CI"))


@pytest.fixture(scope="session")
def shared_data():
    """The real corpora root (``$JAXLM_DATA_DIR``). Missing: a failure in CI, a skip elsewhere."""
    try:
        return data_dir()
    except MissingDataError as err:
        if _data_required():
            pytest.fail(f"real data required but unavailable: {err}")
        pytest.skip(f"{DATA_DIR_ENV} not set or missing: {err}")


@pytest.fixture
def shared_dataset(shared_data):
    """Factory: path of one dataset below the data directory, failing (CI) or skipping if absent."""

    def get(relative: str):
        path = shared_data / relative
        if not path.exists():
            message = f"dataset {relative!r} missing under {shared_data}"
            if _data_required():
                pytest.fail(message)
            pytest.skip(message)
        return path

    return get
