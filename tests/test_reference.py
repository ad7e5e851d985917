"""The reference forms agree with each other and with the math of DESIGN.md, in float64."""

from __future__ import annotations

import itertools
from math import comb

import pytest
import torch

from power_retention import (
    attention_reference,
    recurrent_reference,
    state_bytes,
    sympow_dim,
    sympow_embed,
)

from _helpers import make_inputs, make_state, rel_err


@pytest.mark.parametrize("d,deg", [(1, 2), (3, 2), (8, 2), (5, 4), (4, 6), (64, 2)])
def test_sympow_embedding_is_the_power_kernel(d, deg):
    x, y = torch.randn(2, 7, d, dtype=torch.float64).unbind(0)
    phi_x, phi_y = sympow_embed(x, deg), sympow_embed(y, deg)
    assert phi_x.shape == (7, comb(d + deg - 1, deg)) == (7, sympow_dim(d, deg))
    assert rel_err((phi_x * phi_y).sum(-1), (x * y).sum(-1) ** deg) < 1e-13


def test_sympow_layout_is_ordered_multisets():
    x = torch.arange(1.0, 4.0, dtype=torch.float64)   # d = 3
    phi = sympow_embed(x, 2)
    expected = [(a * b * (1 if i == j else 2 ** 0.5))
                for (i, a), (j, b) in itertools.combinations_with_replacement(enumerate(x), 2)]
    assert torch.allclose(phi, torch.tensor(expected, dtype=torch.float64))


def test_sizes_match_design():
    assert sympow_dim(64, 2) == 2080 and sympow_dim(64, 4) == 766_480
    assert state_bytes(64) == 2080 * 65 * 4
    assert state_bytes(32, 16, deg=4, num_kv_heads=2, num_layers=3) == 52_360 * 17 * 4 * 6


@pytest.mark.parametrize("deg", [2, 4, 6])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_attention_equals_recurrent(deg, gated, with_state):
    q, k, v, g = make_inputs(B=2, T=23, Hq=4, Hk=2, d=4, e=3, gated=gated)
    init = make_state(2, 2, 4, 3, deg) if with_state else None
    o_a, s_a = attention_reference(q, k, v, g, deg=deg, initial_state=init)
    o_r, s_r = recurrent_reference(q, k, v, g, deg=deg, initial_state=init)
    # The recurrent form sums phi(q) . phi(k) = (q . k)^p over D = C(d + p - 1, p) products, so
    # its rounding scales with D and the condition number sum (|q|.|k|)^p / sum (q.k)^p of the
    # weights (up to 7e5 here at p = 6, where the products cancel: 1.6e-12 on a CI machine of
    # 2026-12-06, under 1e-12 on earlier ones). A wrong feature or coefficient errs by O(1).
    kk = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    causal = torch.ones(q.shape[1], q.shape[1], dtype=torch.bool).tril()
    dots = torch.einsum("bihd,bjhd->bhij", q, kk) ** deg * causal
    abs_dots = torch.einsum("bihd,bjhd->bhij", q.abs(), kk.abs()) ** deg * causal
    kappa = float((abs_dots.sum(-1) / dots.sum(-1)).max())
    tol = max(1e-12, sympow_dim(4, deg) * torch.finfo(torch.float64).eps * kappa)
    assert rel_err(o_r, o_a) < tol
    assert rel_err(s_r.S, s_a.S) < 1e-12 and rel_err(s_r.z, s_a.z) < 1e-12


def test_attention_form_matches_the_formula_by_hand():
    q, k, v, g = make_inputs(B=1, T=5, Hq=1, Hk=1, d=3, e=2)
    s, G = 0.7, g[0, :, 0].cumsum(0)
    expected = []
    for i in range(5):
        w = torch.stack([(s * q[0, i, 0] @ k[0, j, 0]) ** 2 * torch.exp(G[i] - G[j])
                         for j in range(i + 1)])
        expected.append((w[:, None] * v[0, : i + 1, 0]).sum(0) / w.sum())
    o, _ = attention_reference(q, k, v, g, deg=2, scale=s)
    assert rel_err(o[0, :, 0], torch.stack(expected)) < 1e-13


def test_zero_denominator_gives_zero_output():
    q, k, v, _ = make_inputs(B=1, T=4, Hq=1, Hk=1, d=3, e=2, gated=False)
    k = torch.zeros_like(k)
    o, _ = attention_reference(q, k, v, deg=2)
    assert torch.equal(o, torch.zeros_like(o))
