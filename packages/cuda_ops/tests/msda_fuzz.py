"""The hypothesis fuzz over op shapes shared by the kernel tests (importable: conftest.py puts this
folder on sys.path)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


def fuzz_op_shapes(*, max_examples, max_queries, head_dims):
    """Decorator: runs the test over random shapes, as the keyword arguments N, Lq, M, D, levels (a list
    of (H, W)), P, spread (how far locations reach outside [0, 1]) and seed; deterministic examples."""

    def decorate(test):
        test = given(
            N=st.integers(1, 3),
            Lq=st.integers(1, max_queries),
            M=st.integers(1, 3),
            D=st.sampled_from(head_dims),
            levels=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=3),
            P=st.integers(1, 4),
            spread=st.floats(0.0, 0.5),
            seed=st.integers(0, 2**16),
        )(test)
        return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                        suppress_health_check=[HealthCheck.function_scoped_fixture])(test)

    return decorate
