"""Group-relative advantages (DESIGN.md "Advantages", KLong eq. 9), hand-worked and property-tested."""

from collections import Counter, defaultdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumers.advantages import EPS, group_advantages

nan = float("nan")
S6 = np.sqrt(1 / 6)  # population std of (1, 0, 0.5)


@pytest.mark.parametrize("groups, stages, q, opts, expected, drops", [
    # one group of three windows (e.g. two rollouts, K = 1 and K = 2): A = Q - mean
    (["a", "a", "a"], [1, 1, 1], [1.0, 0.0, 0.5], {}, [0.5, -0.5, 0.0], {}),
    (["a", "a", "a"], [1, 1, 1], [1.0, 0.0, 0.5], {"std_normalize": True},
     [0.5 / (S6 + EPS), -0.5 / (S6 + EPS), 0.0], {}),
    # the same group_id at another stage is another group
    (["a", "a", "a", "a"], [1, 1, 2, 2], [1.0, 0.0, 0.2, 0.4], {}, [0.5, -0.5, -0.1, 0.1], {}),
    # unrewarded windows join no group and do not move the mean
    (["a", "a", "a"], [1, 1, 1], [1.0, nan, 0.0], {}, [0.5, nan, -0.5], {}),
    # constant groups: A = 0 by default, dropped (and counted) on request
    (["a", "a", "b", "b"], [1, 1, 1, 1], [0.3, 0.3, 0.0, 1.0], {}, [0.0, 0.0, -0.5, 0.5], {}),
    (["a", "a", "b", "b"], [1, 1, 1, 1], [0.3, 0.3, 0.0, 1.0], {"drop_constant_groups": True},
     [nan, nan, -0.5, 0.5], {"constant_group": 2}),
    (["a", "b"], [1, 1], [0.3, 0.7], {"drop_constant_groups": True}, [nan, nan], {"constant_group": 2}),
    (["a", "a"], [1, 1], [0.3, 0.3], {"std_normalize": True}, [0.0, 0.0], {}),  # 0 / (0 + eps)
    ([], [], [], {}, [], {}),
])
def test_group_advantages(groups, stages, q, opts, expected, drops):
    r = group_advantages(groups, stages, q, **opts)
    np.testing.assert_allclose(r.advantage, np.array(expected, dtype=float), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(r.keep, ~np.isnan(np.array(expected, dtype=float)))
    assert r.drops == Counter(drops)


def test_group_numbers_are_shared_within_a_group():
    r = group_advantages(["b", "a", "b", "a"], np.array([1, 1, 1, 2]), [0.1, 0.2, nan, 0.3])
    g = r.group.tolist()
    assert g[2] == -1 and g[0] != g[1] != g[3] and len({g[0], g[1], g[3]}) == 3


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcd"), st.integers(1, 3),
                          st.one_of(st.floats(0, 1), st.just(nan))), max_size=40),
       st.booleans())
def test_advantages_sum_to_zero_and_match_a_naive_groupby(rows, std_normalize):
    groups, stages, q = ([r[i] for r in rows] for i in range(3))
    r = group_advantages(groups, stages, q, std_normalize=std_normalize)
    members = defaultdict(list)
    for i, (g, s, x) in enumerate(rows):
        if not np.isnan(x):
            members[(g, s)].append(i)
    for idx in members.values():
        qs = np.array([q[i] for i in idx])
        expect = qs - qs.mean()
        if std_normalize:
            expect = expect / (qs.std() + EPS)
        np.testing.assert_allclose(r.advantage[idx], expect, atol=1e-9)
        assert abs(r.advantage[idx].sum()) < 1e-6 * max(1, len(idx))
    assert r.keep.tolist() == [not np.isnan(x) for x in q]


def test_baseline_only_windows_join_the_mean_and_single_member_groups_are_counted():
    # group a: r1 (two windows, trained), r2 and r3 baseline-only (an earlier iteration); group b: r4 alone
    r = group_advantages(["a", "a", "a", "a", "b"], [1] * 5, [0.2, 0.2, 1.0, 0.0, 0.7],
                         baseline_only=np.array([False, False, True, True, False]),
                         members=["r1", "r1", "r2", "r3", "r4"])
    mean_a = (0.2 + 0.2 + 1.0 + 0.0) / 4  # 0.35
    np.testing.assert_allclose(r.advantage, [0.2 - mean_a, 0.2 - mean_a, nan, nan, 0.0])
    assert r.keep.tolist() == [True, True, False, False, True]
    assert r.counts == {"groups": 2, "single_member_groups": 1, "single_member_windows": 1, "baseline_windows": 2}
    # drop_constant_groups looks at the whole group, baseline included, and counts trained windows only
    r = group_advantages(["a", "a", "a"], [1] * 3, [0.5, 0.5, 0.9], drop_constant_groups=True,
                         baseline_only=np.array([False, False, True]))
    assert r.keep.tolist() == [True, True, False] and not r.drops
    r = group_advantages(["a", "a", "a"], [1] * 3, [0.5, 0.5, 0.5], drop_constant_groups=True,
                         baseline_only=np.array([False, False, True]))
    assert r.drops == Counter({"constant_group": 2})
