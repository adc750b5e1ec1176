"""Bootstrap over prompts: validation, known intervals, reproducibility."""

from __future__ import annotations

import pytest
import torch

from mechdelta import Bootstrap, ConfigError
from mechdelta.stats.bootstrap import paired_shift_ci, score_ci


def test_bootstrap_validates_its_settings():
    with pytest.raises(ConfigError, match="n_boot=99 is too few"):
        Bootstrap(n_boot=99)
    for alpha in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match=f"alpha={alpha} must lie in \\(0, 1\\)"):
            Bootstrap(alpha=alpha)
    assert Bootstrap(n_boot=100, alpha=0.5).alpha == 0.5


def test_weights_are_resampling_counts_and_seeded():
    boot = Bootstrap(n_boot=200, seed=3)
    w = boot.weights(7)
    assert w.shape == (200, 7) and w.dtype == torch.float64
    assert torch.allclose(w.sum(1), torch.ones(200, dtype=torch.float64))
    counts = w * 7
    assert torch.equal(counts, counts.round()) and (counts >= 0).all()
    assert torch.equal(w, Bootstrap(n_boot=200, seed=3).weights(7))
    assert not torch.equal(w, Bootstrap(n_boot=200, seed=4).weights(7))


def test_percentile_interval_of_known_samples():
    samples = torch.arange(101, dtype=torch.float64)
    assert Bootstrap(alpha=0.1).interval(samples).tolist() == [5.0, 95.0]
    with_nan = torch.cat([samples, torch.full((50,), float("nan"), dtype=torch.float64)])
    assert Bootstrap(alpha=0.1).interval(with_nan).tolist() == [5.0, 95.0]  # NaNs ignored
    stacked = Bootstrap(alpha=0.1).interval(torch.stack([samples, 2 * samples]))
    assert stacked.tolist() == [[5.0, 95.0], [10.0, 190.0]]


def test_ci_of_a_constant_shift_is_a_point():
    reference = torch.tensor([0.3, -1.2, 2.0, 0.7, 5.5])
    ci = paired_shift_ci(reference, reference + 0.5, Bootstrap(n_boot=500))
    assert abs(ci[0].item() - 0.5) < 1e-6 and abs(ci[1].item() - 0.5) < 1e-6
    zero = paired_shift_ci(reference, reference, Bootstrap(n_boot=500))
    assert zero.tolist() == [0.0, 0.0]


def test_shift_ci_contains_the_mean_and_is_reproducible():
    gen = torch.Generator().manual_seed(0)
    reference = torch.randn(20, generator=gen)
    intervened = reference + 1.0 + 0.5 * torch.randn(20, generator=gen)
    mean = (intervened - reference).mean().item()
    ci = paired_shift_ci(reference, intervened, Bootstrap(seed=1))
    assert ci[0].item() < mean < ci[1].item()
    assert torch.equal(ci, paired_shift_ci(reference, intervened, Bootstrap(seed=1)))
    assert not torch.equal(ci, paired_shift_ci(reference, intervened, Bootstrap(seed=2)))
    wider = paired_shift_ci(reference, intervened, Bootstrap(seed=1, alpha=0.01))
    assert wider[0] <= ci[0] and wider[1] >= ci[1]


def test_score_ci_of_full_and_null_restoration():
    gen = torch.Generator().manual_seed(0)
    reference = torch.randn(12, generator=gen)
    intervened = reference + 2.0 + 0.1 * torch.randn(12, generator=gen)
    patched = torch.stack([reference, intervened, (reference + intervened) / 2])
    boot = Bootstrap(n_boot=300)
    toward = score_ci(reference, intervened, patched, boot, toward_reference=True)
    away = score_ci(reference, intervened, patched, boot, toward_reference=False)
    assert toward.shape == (3, 2)
    # restoring the reference's values undoes the whole shift: score 1 in every resample
    assert torch.allclose(toward[0], torch.tensor([1.0, 1.0])) and torch.allclose(
        toward[1], torch.tensor([0.0, 0.0])
    )
    assert torch.allclose(away[0], torch.tensor([0.0, 0.0])) and torch.allclose(
        away[1], torch.tensor([1.0, 1.0])
    )
    assert torch.allclose(toward[2], torch.tensor([0.5, 0.5])) and torch.allclose(
        away[2], torch.tensor([0.5, 0.5])
    )
    # no shift at all: every resample's fraction is undefined
    null = score_ci(reference, reference, patched, boot, toward_reference=True)
    assert null.isnan().all()


@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.2, 0.5])
def test_interval_equals_torch_quantile(alpha):
    """The topk-based percentile interval is torch's linear-interpolation quantile."""
    gen = torch.Generator().manual_seed(0)
    samples = torch.randn(37, 2000, generator=gen, dtype=torch.float64)
    q = torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64)
    want = torch.quantile(samples, q, dim=-1).movedim(0, -1)
    got = Bootstrap(alpha=alpha).interval(samples)
    assert (got - want).abs().max().item() < 1e-12
    samples[3, 5] = float("nan")  # NaN samples are ignored (nanquantile path)
    assert torch.isfinite(Bootstrap(alpha=alpha).interval(samples)).all()
