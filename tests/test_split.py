"""Sub-trajectory splitting (DESIGN.md "Sub-trajectories", KLong eq. 4-6).

Hand-worked tables for each rule, then hypothesis properties over random trajectories checked
against a deliberately naive reference of the greedy and an independent decoding of the tokens.
"""

from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumers.split import SplitConfig, split_rollout
from store.windows import flatten_tokens, materialize, materialize_flat
from consumers.turns import build_turns
from schemas.errors import ConfigError

U, A, T, S = "user", "assistant", "tool", "system"


def run(roles, pins, n_tok, **cfg):
    pinned = np.zeros(len(roles), bool)
    pinned[pins] = True
    return split_rollout(roles, pinned, n_tok, SplitConfig(**cfg))


def spans(w):
    return [tuple(s) for s in w.spans.tolist()]


def tokens_for(n_tok):
    """Token ids that say where they come from: step * 1000 + position in the step."""
    return [np.arange(n) + 1000 * s for s, n in enumerate(n_tok)]


# ---- hand-worked examples -------------------------------------------------------------------------

# prefix = step 0 (4 tokens); turns: 0 = [1] (2), 1 = [2, 3] (6), 2 = [4, 5] (6)
EX = ([U, A, U, A, U, A], [0], [4, 2, 4, 2, 4, 2])


def test_two_windows_with_overlap():
    r = run(*EX, max_tokens=16, overlap_turns=1)  # B = 12: turns 0-1 (8), then t = max(1, 2 - 1) = 1
    assert (r.prefix_len, r.prefix_tokens, r.budget, r.drops) == (1, 4, 12, Counter())
    assert [s for s in r.prefix_spans.tolist()] == [[0, 0, 4, 0]]
    w0, w1 = r.windows
    assert (w0.window_idx, w0.first_turn, w0.last_turn, w0.n_turns, w0.first_step, w0.last_step) == (0, 0, 1, 2, 1, 3)
    assert spans(w0) == [(1, 0, 2, 1), (2, 0, 4, 0), (3, 0, 2, 1)]
    assert (w0.n_tokens, w0.n_loss_tokens, w0.obs_truncated, w0.prefix_loss) == (12, 4, False, True)
    assert (w1.window_idx, w1.first_turn, w1.last_turn, w1.n_turns, w1.first_step, w1.last_step) == (1, 1, 2, 2, 2, 5)
    assert spans(w1) == [(2, 0, 4, 0), (3, 0, 2, 1), (4, 0, 4, 0), (5, 0, 2, 1)]
    assert (w1.n_tokens, w1.n_loss_tokens, w1.obs_truncated, w1.prefix_loss) == (16, 4, False, False)

    ids, mask = materialize(r, w1, tokens_for(EX[2]))
    assert ids.dtype == np.int32 and mask.dtype == np.uint8
    assert ids.tolist() == [0, 1, 2, 3, 2000, 2001, 2002, 2003, 3000, 3001, 4000, 4001, 4002, 4003, 5000, 5001]
    assert mask.tolist() == [0] * 8 + [1, 1] + [0] * 4 + [1, 1]


def test_loss_on_overlap_off_masks_turns_of_the_previous_window():
    r = run(*EX, max_tokens=16, overlap_turns=1, loss_on_overlap=False)
    w0, w1 = r.windows
    assert spans(w0) == [(1, 0, 2, 1), (2, 0, 4, 0), (3, 0, 2, 1)]  # nothing before window 0
    assert spans(w1) == [(2, 0, 4, 0), (3, 0, 2, 0), (4, 0, 4, 0), (5, 0, 2, 1)]
    assert (w0.n_loss_tokens, w1.n_loss_tokens) == (4, 2)
    assert materialize(r, w1, tokens_for(EX[2]))[1].sum() == 2


def test_fits_whole_is_one_window():
    r = run(*EX, max_tokens=18, overlap_turns=3)
    assert len(r.windows) == 1
    w = r.windows[0]
    assert (w.first_turn, w.last_turn, w.first_step, w.last_step, w.n_tokens, w.n_loss_tokens) == (0, 2, 1, 5, 18, 6)


@pytest.mark.parametrize("overlap, expected", [
    (0, [(0, 2), (3, 5)]),
    (1, [(0, 2), (2, 4), (4, 5)]),
    (2, [(0, 2), (1, 3), (2, 4), (3, 5)]),
    (9, [(0, 2), (1, 3), (2, 4), (3, 5)]),  # t_{i+1} = max(t_i + 1, e_i - O): always moves on
])
def test_overlap_in_turns(overlap, expected):
    r = run([A] * 6, [], [1] * 6, max_tokens=3, overlap_turns=overlap)  # 3 one-token turns per window
    assert [(w.first_turn, w.last_turn) for w in r.windows] == expected
    assert all(w.n_tokens <= 3 for w in r.windows)


@pytest.mark.parametrize("max_tokens", [3, 4])
def test_prefix_too_long_drops_the_rollout(max_tokens):
    r = run(*EX[:2], [4, 2, 4, 2, 4, 2], max_tokens=max_tokens)  # B = max_tokens - 4 <= 0
    assert r.windows == [] and r.drops == Counter(prefix_too_long=1)


def test_turn_whose_action_exceeds_budget_is_dropped_before_windowing():
    r = run([U, A, U, A, U, A], [], [1, 1, 1, 9, 1, 1], max_tokens=5)  # turn 1: action 9 > B = 5
    assert r.drops == Counter(turn_too_long=1)
    (w,) = r.windows  # turns 0 and 2 now sit next to each other and fit together
    assert (w.first_turn, w.last_turn, w.n_turns, w.first_step, w.last_step, w.n_tokens) == (0, 2, 2, 0, 5, 4)
    assert spans(w) == [(0, 0, 1, 0), (1, 0, 1, 1), (4, 0, 1, 0), (5, 0, 1, 1)]


# prefix = step 0 (3 tokens); one turn: user 4, tool 5, assistant 2 = 11 tokens
TR = ([S, U, T, A], [0], [3, 4, 5, 2])


@pytest.mark.parametrize("max_tokens, expected_spans, first_step", [
    (11, [(1, 3, 4, 0), (2, 0, 5, 0), (3, 0, 2, 1)], 1),  # B = 8, room 6: last token of step 1
    (10, [(2, 0, 5, 0), (3, 0, 2, 1)], 2),  # room 5: step 2 whole, step 1 leaves entirely
    (9, [(2, 1, 5, 0), (3, 0, 2, 1)], 2),  # room 4: step 2 cut at its front
    (5, [(3, 0, 2, 1)], 3),  # room 0: the action alone
])
def test_oversized_turn_keeps_action_and_last_observation_tokens(max_tokens, expected_spans, first_step):
    r = run(*TR, max_tokens=max_tokens)
    (w,) = r.windows
    assert spans(w) == expected_spans
    assert (w.first_step, w.last_step, w.n_tokens, w.obs_truncated, w.n_loss_tokens) == (first_step, 3, max_tokens, True, 2)
    ids, mask = materialize(r, w, tokens_for(TR[2]))
    body = [1000 * s + k for s, lo, hi, _ in expected_spans for k in range(lo, hi)]
    assert ids.tolist() == [0, 1, 2] + body
    assert mask.tolist() == [0] * (len(ids) - 2) + [1, 1]


def test_oversized_action_drops_the_turn():
    r = run(*TR, max_tokens=4)  # B = 1 < action 2
    assert r.windows == [] and r.drops == Counter(turn_too_long=1, no_turns=1)


@pytest.mark.parametrize("roles, drops", [
    ([U, A, T, T], Counter(trailing_observations=2)),
    ([U, T], Counter(trailing_observations=2, no_turns=1)),
    ([], Counter(no_turns=1)),
])
def test_trailing_observations_and_empty_rollouts_are_counted(roles, drops):
    r = run(roles, [], [1] * len(roles), max_tokens=100)
    assert r.drops == drops
    assert len(r.windows) == (1 if A in roles else 0)


# prefix = system (1) + assistant (3) = 4 tokens, 3 of them assistant; two 4-token turns; B = 4
PL = ([S, A, U, A, U, A], [0, 1], [1, 3, 2, 2, 2, 2])


@pytest.mark.parametrize("policy, flags, n_loss", [
    ("first", [True, False], [5, 2]),
    ("always", [True, True], [5, 5]),
    ("never", [False, False], [2, 2]),
])
def test_prefix_loss(policy, flags, n_loss):
    r = run(*PL, max_tokens=8, prefix_loss=policy)
    assert [w.prefix_loss for w in r.windows] == flags
    assert [w.n_loss_tokens for w in r.windows] == n_loss
    for w, flag in zip(r.windows, flags):
        ids, mask = materialize(r, w, tokens_for(PL[2]))
        assert ids[:4].tolist() == [0, 1000, 1001, 1002]
        assert mask.tolist() == [0] + [int(flag)] * 3 + [0, 0, 1, 1]


def test_materialize_flat_matches_per_step_arrays_and_checks_lengths():
    r = run(*EX, max_tokens=16, overlap_turns=1)
    toks = tokens_for(EX[2])
    for w in r.windows:
        a, b = materialize(r, w, toks), materialize_flat(r, w, *flatten_tokens(toks))
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    with pytest.raises(Exception, match="n_tokens"):
        materialize(r, r.windows[0], tokens_for([4, 2, 5, 2, 4, 2]))


def test_spans_are_read_only():
    w = run(*EX, max_tokens=16, overlap_turns=1).windows[0]
    with pytest.raises(ValueError):
        w.spans[0, 3] = 0


@pytest.mark.parametrize("kwargs, key", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=1.5), "max_tokens"),
    (dict(max_tokens=True), "max_tokens"),
    (dict(max_tokens="8"), "max_tokens"),
    (dict(max_tokens=8, overlap_turns=-1), "overlap_turns"),
    (dict(max_tokens=8, overlap_turns=None), "overlap_turns"),
    (dict(max_tokens=8, loss_on_overlap="yes"), "loss_on_overlap"),
    (dict(max_tokens=8, prefix_loss="sometimes"), "prefix_loss"),
])
def test_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        SplitConfig(**kwargs)


def test_config_from_mapping_takes_its_keys_only():
    cfg = SplitConfig.from_mapping({"max_tokens": 64, "overlap_turns": 2, "reward_mode": "final"})
    assert cfg == SplitConfig(max_tokens=64, overlap_turns=2)
    with pytest.raises(ConfigError, match="max_tokens"):
        SplitConfig.from_mapping({"overlap_turns": 2})


# ---- properties over random trajectories ----------------------------------------------------------

ROLES = st.sampled_from([U, A, A, T, S])


@st.composite
def trajectories(draw):
    n = draw(st.integers(0, 40))
    roles = draw(st.lists(ROLES, min_size=n, max_size=n))
    n_tok = draw(st.lists(st.integers(0, 12), min_size=n, max_size=n))
    p = draw(st.integers(0, min(n, 4)))  # pin step p - 1 (and maybe some before it)
    pinned = [i < p and (i == p - 1 or draw(st.booleans())) for i in range(n)]
    cfg = SplitConfig(max_tokens=draw(st.integers(1, 60)), overlap_turns=draw(st.integers(0, 4)),
                      loss_on_overlap=draw(st.booleans()), prefix_loss=draw(st.sampled_from(["first", "never", "always"])))
    return roles, pinned, n_tok, cfg


def reference_windows(obs, act, budget, overlap):
    """The greedy of eq. 4 written the obvious way, over kept turns (turn numbers returned)."""
    kept = [k for k in range(len(act)) if act[k] <= budget]
    size = [min(obs[k] + act[k], budget) for k in kept]
    out, t = [], 0
    while kept:
        e, used = t, 0
        while e < len(kept) and used + size[e] <= budget:
            used, e = used + size[e], e + 1
        out.append(kept[t:e])
        if e == len(kept):
            break
        t = max(t + 1, e - overlap)
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trajectories())
def test_split_properties(traj):
    roles, pinned, n_tok, cfg = traj
    r = split_rollout(roles, pinned, n_tok, cfg)
    turns = build_turns(roles, pinned, n_tok)
    p, budget = turns.prefix_len, cfg.max_tokens - turns.prefix_tokens
    obs, act, end = turns.obs_tokens.tolist(), turns.act_tokens.tolist(), turns.end_step.tolist()
    if budget <= 0:
        assert r.windows == [] and r.drops["prefix_too_long"] == 1
        return
    expected = reference_windows(obs, act, budget, cfg.overlap_turns)
    turn_of = {s: k for k, s in enumerate(end)}
    got = [[turn_of[s] for s, _, _, _ in w.spans.tolist() if roles[s] == A] for w in r.windows]
    assert got == expected  # windows cover all kept turns, in order, as the greedy says
    assert r.drops["turn_too_long"] == sum(a > budget for a in act)
    assert r.drops["trailing_observations"] == turns.n_dropped_obs

    toks = tokens_for(n_tok)
    trained = set()
    for i, w in enumerate(r.windows):
        assert w.window_idx == i and w.n_turns == len(got[i])
        assert (w.first_turn, w.last_turn) == (got[i][0], got[i][-1])
        assert w.n_tokens <= cfg.max_tokens
        assert w.prefix_loss == (cfg.prefix_loss == "always" or (cfg.prefix_loss == "first" and i == 0))
        if i:  # consecutive windows share exactly min(O, len_prev - 1) turns: the tail of one, the head of the next
            shared = min(cfg.overlap_turns, len(got[i - 1]) - 1)
            assert set(got[i - 1]) & set(got[i]) == set(got[i][:shared]) == set(got[i - 1][len(got[i - 1]) - shared:])
        ids, mask = materialize(r, w, toks)
        assert len(ids) == len(mask) == w.n_tokens and int(mask.sum()) == w.n_loss_tokens
        # Decode each token's origin: the prefix whole, then per step a suffix of it, steps ascending.
        step, pos = ids // 1000, ids % 1000
        prefix = [1000 * s + k for s in range(p) for k in range(n_tok[s])]
        assert ids[: len(prefix)].tolist() == prefix
        body_steps = step[len(prefix):]
        assert np.all(np.diff(body_steps) >= 0) and np.all(body_steps >= p)
        assert all(roles[s] == A for s in step[mask == 1].tolist())
        for s in np.unique(body_steps).tolist():
            got_pos = pos[len(prefix):][body_steps == s].tolist()
            assert got_pos == list(range(n_tok[s] - len(got_pos), n_tok[s]))  # a suffix of the step
            if roles[s] == A:
                assert len(got_pos) == n_tok[s]  # actions are never cut
        assert w.first_step == w.spans[0, 0] and w.last_step == w.spans[-1, 0] == end[got[i][-1]]
        assert w.obs_truncated == any(obs[k] + act[k] > budget for k in got[i])
        trained |= {s for s, _, _, loss in w.spans.tolist() if loss}
    kept_actions = {end[k] for k in range(len(end)) if act[k] <= budget}
    assert trained == kept_actions  # every kept action trains in at least one window
    if expected and turns.prefix_tokens + sum(obs) + sum(act) <= cfg.max_tokens:
        assert len(r.windows) == 1  # fits whole: K = 1
