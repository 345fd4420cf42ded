"""Fixtures shared by the engine tests."""

import pytest

from tests.engine.engine_helpers import open_demo_engine


@pytest.fixture(scope="module")
def demo_engine(tmp_path_factory):
    """The demo engine, one per test module: small batches and prefill chunks, so steps mix prefills and decodes."""
    engine = open_demo_engine(tmp_path_factory.mktemp("store"), max_num_seqs=16, max_num_batched_tokens=96,
                              prefill_chunk_size=24)
    yield engine
    engine.close()
    engine.store.close()
