"""Aggregation strategies on tensors alone, against the formulas they stand for."""

from __future__ import annotations

import pytest
import torch

from hived.hive.aggregation import CenteredClip, CenteredClipping, TrimmedMean, WeightedMean


def feed(agg, updates: dict[str, torch.Tensor], weights: dict[str, float] | None = None,
         scales: dict[str, float] | None = None):
    """Each update in two parts (its halves), as the coordinator feeds them, then committed."""
    for key, u in updates.items():
        half = len(u) // 2
        w = (weights or {}).get(key, 1.0)
        agg.add(key, [("a", u[:half], u[:half])], w)
        agg.add(key, [("b", u[half:], u[half:])], w)
    for key in updates:
        agg.commit(key, (scales or {}).get(key, 1.0))
    out = agg.result()
    return None if out is None else torch.cat([out["a"], out["b"]])


def split(t: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"a": t[:len(t) // 2], "b": t[len(t) // 2:]}


def test_centered_clip_matches_its_formula():
    torch.manual_seed(0)
    center = torch.randn(10)
    updates = {"h1": center + 0.1 * torch.randn(10), "h2": center + 0.1 * torch.randn(10),
               "h3": center + 0.1 * torch.randn(10), "bad": -10 * center}
    weights = {"h1": 1.0, "h2": 0.5, "h3": 1.0, "bad": 1.0}
    scales = {"h2": 0.8}
    agg = CenteredClip(split(center), max_iterations=3, tolerance=0.0)
    got = feed(agg, updates, weights, scales)
    xs = {k: scales.get(k, 1.0) * u for k, u in updates.items()}
    v, total, radii = center.clone(), sum(weights.values()), []
    for _ in range(3):
        d = {k: (x - v).norm().item() for k, x in xs.items()}
        radius = sorted(d.values())[1:3]
        radius = sum(radius) / 2  # the median of four
        radii.append(radius)
        v = v + sum(weights[k] * min(1.0, radius / d[k]) * (x - v) for k, x in xs.items()) / total
    assert torch.allclose(got, v, atol=1e-5)
    assert agg.radii == pytest.approx(radii, rel=1e-5)
    honest = sum(weights[k] * xs[k] for k in ("h1", "h2", "h3")) / (total - weights["bad"])
    assert (got - honest).norm() < 0.1 * (updates["bad"] - honest).norm() / len(updates)


def test_centered_clipping_starts_each_round_from_the_last_result():
    """A sign-flipped update barely moves the result off the honest updates' mean, where it
    halves the plain mean; the center carries over rounds and through a checkpoint."""
    torch.manual_seed(1)
    strategy = CenteredClipping(lambda v: v)
    g = torch.randn(100)
    for round_ in range(2):
        updates = {k: g + 0.3 * torch.randn(100) for k in ("a", "b", "c")}
        honest = sum(updates.values()) / 3
        updates["evil"] = -g
        got = feed(strategy.round(), updates)
        mean = feed(WeightedMean(), updates)
        assert (got - honest).norm() < 0.25 * (mean - honest).norm()  # its bias: about radius / n
        assert torch.equal(torch.cat([strategy.center["a"], strategy.center["b"]]), got)
    again = CenteredClipping(lambda v: v)
    again.load_state_dict(strategy.state_dict())
    assert torch.equal(again.center["a"], strategy.center["a"])


def test_trimmed_mean_drops_the_extremes_of_every_value():
    updates = {f"p{i}": torch.tensor([float(i), -float(i), 1.0, 1.0]) for i in range(5)}
    updates["evil"] = torch.tensor([1e6, -1e6, 1e6, -1e6])
    got = feed(TrimmedMean(0.2), updates, scales={"p4": 0.5})
    # six updates: trim ceil(0.2 x 6) = 2 from each end of every value
    values = torch.stack([u * (0.5 if k == "p4" else 1.0) for k, u in updates.items()]).sort(dim=0).values
    assert torch.allclose(got, values[2:4].mean(dim=0))
    agg = TrimmedMean(0.25)
    agg.add("gone", [("a", torch.ones(2), torch.ones(2))], 1.0)
    agg.discard("gone")
    assert agg.result() is None


def test_a_rejected_update_is_not_held():
    agg = CenteredClip({})
    agg.add("bad", [("a", torch.full((2,), 50.0), torch.full((2,), 50.0))], 1.0)
    agg.discard("bad")
    assert torch.equal(feed(agg, {"ok": torch.ones(4)}), torch.ones(4)) and agg.count == 1
