import torch

from ditctl.engine.objective import (TimestepDensity, noised_batch, per_sample_mse, sample_seed,
                                     shift_timesteps)
from ditctl.models.base import Conditioning, LatentDist


class FakeFamily:
    """Just what the objective asks a family: identity latents, an all-zero empty
    conditioning (sequence and pooled), the shift rule."""

    def sample_latents(self, dist, generator):
        eps = torch.randn(dist.mean.shape, generator=generator)
        return dist.mean + dist.std * eps

    def empty_conditioning(self, batch, like=None):
        return like.map(lambda _, t: torch.zeros((batch, *t.shape[1:]), dtype=t.dtype))

    def resolution_shift(self, h, w):
        return 2.0 * (h * w / 4096) ** 0.5


def test_shift_matches_flite_formula():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.equal(shift_timesteps(t, 1.0), t)
    torch.testing.assert_close(shift_timesteps(t, 4.0), 4 * t / (1 + 3 * t))
    assert shift_timesteps(torch.tensor([0.5]), 2.0) > 0.5  # towards noise


def test_sample_seed_depends_on_every_counter():
    seeds = {sample_seed(1, e, b, j, r) for e in range(2) for b in range(3) for j in range(4)
             for r in range(2)}
    assert len(seeds) == 48
    assert sample_seed(1, 0, 0, 0, 0) == sample_seed(1, 0, 0, 0, 0) != sample_seed(2, 0, 0, 0, 0)


def test_noised_batch_follows_the_rectified_flow_by_hand():
    family = FakeFamily()
    mean = torch.randn(2, 16, 4, 4)
    dist = LatentDist(mean, torch.full_like(mean, 0.1))
    text = torch.randn(2, 5, 8)
    pooled = torch.randn(2, 3)
    density = TimestepDensity(0.0, 1.0, 0.0)
    batch = noised_batch(family, dist, Conditioning(text, pooled=pooled), [11, 12], density,
                         caption_dropout=0.0, shift=True)
    # sample 1 by hand from its own generator, in the documented draw order
    g = torch.Generator().manual_seed(12)
    x0 = mean[1:2] + 0.1 * torch.randn(1, 16, 4, 4, generator=g)
    noise = torch.randn(1, 16, 4, 4, generator=g)
    logit = torch.randn(1, generator=g)
    t = shift_timesteps(torch.sigmoid(logit), 2.0 * (16 / 4096) ** 0.5)
    torch.testing.assert_close(batch.t[1:2], t)
    torch.testing.assert_close(batch.noisy[1:2], (1 - t) * x0 + t * noise)
    torch.testing.assert_close(batch.target[1:2], x0 - noise)
    assert torch.equal(batch.cond.sequence, text) and torch.equal(batch.cond.pooled, pooled)


def test_batch_split_does_not_change_a_samples_randomness():
    family = FakeFamily()
    mean = torch.randn(3, 16, 2, 2)
    dist = LatentDist(mean, torch.ones_like(mean))
    text = torch.randn(3, 4, 8)
    density = TimestepDensity()
    whole = noised_batch(family, dist, Conditioning(text), [5, 6, 7], density, 0.5, True)
    last = noised_batch(family, LatentDist(mean[2:], torch.ones_like(mean[2:])),
                        Conditioning(text[2:]), [7], density, 0.5, True)
    assert torch.equal(whole.noisy[2:], last.noisy) and torch.equal(whole.t[2:], last.t)


def test_uniform_fraction_and_caption_dropout_rates():
    family = FakeFamily()
    n = 4000
    mean = torch.zeros(n, 1, 1, 1)
    dist = LatentDist(mean, torch.ones_like(mean))
    text = Conditioning(torch.ones(n, 2, 2), pooled=torch.ones(n, 3))
    batch = noised_batch(family, dist, text, list(range(n)), TimestepDensity(0, 1, 0.0), 0.25, False)
    dropped = batch.cond.sequence.flatten(1).abs().sum(1) == 0
    assert 0.22 < dropped.float().mean() < 0.28
    # the whole conditioning of a dropped caption is the empty one, pooled vector included
    assert torch.equal(batch.cond.pooled.abs().sum(1) == 0, dropped)
    # logit-normal: few timesteps near the ends; uniform: many
    logit_normal = ((batch.t < 0.05) | (batch.t > 0.95)).float().mean()
    uniform = noised_batch(family, dist, text, list(range(n)), TimestepDensity(0, 1, 1.0), 0, False)
    assert logit_normal < 0.02 and ((uniform.t < 0.05) | (uniform.t > 0.95)).float().mean() > 0.07


def test_per_sample_mse_is_fp32_mean_per_sample():
    pred = torch.ones(2, 3, 2, 2, dtype=torch.bfloat16)
    target = torch.zeros(2, 3, 2, 2)
    target[1] = 3
    loss = per_sample_mse(pred, target)
    assert loss.dtype == torch.float32 and torch.equal(loss, torch.tensor([1.0, 4.0]))


def test_a_dropped_caption_becomes_the_families_unconditional_encoding():
    """Families whose unconditional input is a prompt's encoding hand it to the objective:
    every dropped caption trains on exactly that, pooled vector included."""
    family = FakeFamily()
    n = 400
    mean = torch.zeros(n, 1, 1, 1)
    dist = LatentDist(mean, torch.ones_like(mean))
    text = Conditioning(torch.ones(n, 2, 2), pooled=torch.ones(n, 3))
    empty_prompt = Conditioning(torch.full((1, 2, 2), 7.0), pooled=torch.full((1, 3), 5.0))
    batch = noised_batch(family, dist, text, list(range(n)), TimestepDensity(0, 1, 0.0), 0.25,
                         False, unconditional=empty_prompt)
    dropped = batch.cond.sequence[:, 0, 0] == 7.0
    assert 0.18 < dropped.float().mean() < 0.32
    assert torch.equal(batch.cond.sequence[dropped], empty_prompt.sequence.expand(
        int(dropped.sum()), 2, 2))
    assert torch.equal(batch.cond.pooled[dropped], empty_prompt.pooled.expand(
        int(dropped.sum()), 3))
    assert torch.equal(batch.cond.sequence[~dropped], text.sequence[~dropped])


# --- timestep densities, shifts and loss weights ([train] timestep_sampling, ...) ------------

import math  # noqa: E402

import pytest  # noqa: E402

from ditctl.config import build_config  # noqa: E402
from ditctl.engine.objective import (cosmap_timesteps, describe_objective, loss_weights,  # noqa: E402
                                     masked_mse, mode_timesteps, per_sample_loss, shift_alpha)
from ditctl.errors import ConfigError  # noqa: E402


def _draws(density, n=6000, shift=False, family=None):
    family = family or FakeFamily()
    mean = torch.zeros(n, 1, 1, 1)
    dist = LatentDist(mean, torch.ones_like(mean))
    return noised_batch(family, dist, Conditioning(torch.ones(n, 2, 2)), list(range(n)), density,
                        0.3, shift)


def _phi(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _logit(p):
    return math.log(p / (1 - p))


def _mode_inverse(t, scale):
    """u with mode_timesteps(u) = t (the map decreases in u), by bisection."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float(mode_timesteps(torch.tensor(mid), scale)) > t else (lo, mid)
    return lo


# (density, expected mean of t, expected P(0.4 < t < 0.6)); tolerance 0.02 at 6000 draws
DENSITIES = [
    # logit-normal(m, 1): P = Φ(logit 0.6 - m) - Φ(logit 0.4 - m)
    (TimestepDensity(0.0, 1.0, 0.0), 0.5, _phi(_logit(0.6)) - _phi(_logit(0.4))),
    (TimestepDensity(1.0, 1.0, 0.0), 0.696, _phi(_logit(0.6) - 1) - _phi(_logit(0.4) - 1)),
    (TimestepDensity(sampling="uniform"), 0.5, 0.2),
    # mode: scale 0 is uniform; SD3's 1.29 favours the middle (P = u(0.4) - u(0.6))
    (TimestepDensity(sampling="mode", mode_scale=0.0), 0.5, 0.2),
    (TimestepDensity(sampling="mode", mode_scale=1.29), 0.5,
     _mode_inverse(0.4, 1.29) - _mode_inverse(0.6, 1.29)),
    # cosmap: u = (2/π)·atan(t / (1 - t))
    (TimestepDensity(sampling="cosmap"), 0.5, 2 / math.pi * (math.atan(1.5) - math.atan(2 / 3))),
]


@pytest.mark.parametrize("density, mean, middle", DENSITIES)
def test_each_timestep_density_has_its_documented_shape(density, mean, middle, tol=0.02):
    t = _draws(density).t
    assert 0 <= t.min() and t.max() <= 1
    assert abs(float(t.mean()) - mean) < tol
    assert abs(float(((t > 0.4) & (t < 0.6)).float().mean()) - middle) < tol


def test_mode_and_cosmap_maps_by_hand():
    u = torch.tensor([0.0, 0.25, 0.5, 0.75])
    # SD3 eq. 20 and 21: fixed points and values at known u
    assert torch.allclose(mode_timesteps(u, 0.0), 1 - u)
    torch.testing.assert_close(mode_timesteps(u, 1.0),
                               1 - u - (torch.cos(math.pi * u / 2) ** 2 - 1 + u))
    assert float(mode_timesteps(torch.tensor([0.5]), 1.29)) == pytest.approx(0.5)
    torch.testing.assert_close(cosmap_timesteps(u), torch.tensor(
        [0.0, 1 - 1 / (math.tan(math.pi / 8) + 1), 0.5, 1 - 1 / (math.tan(3 * math.pi / 8) + 1)]))


def test_the_timestep_rule_changes_t_and_nothing_else():
    """Every draw is made whatever the density: noise and dropped captions stay."""
    base = _draws(TimestepDensity(), n=200)
    for density in (TimestepDensity(sampling="uniform"), TimestepDensity(sampling="cosmap"),
                    TimestepDensity(sampling="mode", fixed_shift=3.0)):
        other = _draws(density, n=200)
        assert torch.equal(other.target, base.target)
        assert torch.equal(other.cond.sequence, base.cond.sequence)
        assert not torch.equal(other.t, base.t)


def test_a_fixed_shift_replaces_the_resolution_rule():
    family = FakeFamily()
    assert shift_alpha(family, 64, 64, True) == family.resolution_shift(64, 64)
    assert shift_alpha(family, 64, 64, False) == 1.0
    assert shift_alpha(family, 64, 64, False, 3.0) == shift_alpha(family, 64, 64, True, 3.0) == 3.0
    plain = _draws(TimestepDensity(sampling="uniform"), n=300)
    shifted = _draws(TimestepDensity(sampling="uniform", fixed_shift=3.0), n=300)
    torch.testing.assert_close(shifted.t, shift_timesteps(plain.t, 3.0))


@pytest.mark.parametrize("weighting, t, expected", [
    ("sigma_sqrt", [0.5, 0.25, 1.0], [4.0, 16.0, 1.0]),
    ("cosmap", [0.5, 0.0, 1.0], [4 / math.pi, 2 / math.pi, 2 / math.pi]),
])
def test_loss_weights_at_known_timesteps(weighting, t, expected):
    torch.testing.assert_close(loss_weights(torch.tensor(t), weighting), torch.tensor(expected))


def test_no_weighting_leaves_the_loss_untouched():
    assert loss_weights(torch.tensor([0.3]), "none") is None
    batch = _draws(TimestepDensity(), n=4)
    assert batch.weight is None
    pred = torch.randn_like(batch.target)
    assert torch.equal(per_sample_loss(pred, batch), per_sample_mse(pred, batch.target))
    weighted = noised_batch(FakeFamily(), LatentDist(torch.zeros(4, 1, 1, 1), torch.ones(4, 1, 1, 1)),
                            Conditioning(torch.ones(4, 2, 2)), list(range(4)), TimestepDensity(),
                            0.3, False, weighting="sigma_sqrt")
    assert torch.equal(weighted.t, batch.t)
    torch.testing.assert_close(per_sample_loss(pred, weighted),
                               per_sample_mse(pred, batch.target) / batch.t ** 2)


def test_a_masked_out_area_gets_no_gradient():
    target = torch.randn(2, 4, 3, 3)
    mask = torch.ones(2, 1, 3, 3)
    mask[0, :, :, 0] = 0  # sample 0: left column ignored
    mask[1] = 0.5  # sample 1: a uniform mask is the plain MSE
    prediction = torch.randn(2, 4, 3, 3, requires_grad=True)
    from ditctl.engine.objective import NoisedBatch

    batch = NoisedBatch(prediction.detach(), torch.rand(2), Conditioning(torch.ones(2, 1, 1)),
                        target, mask=mask)
    loss = per_sample_loss(prediction, batch)
    loss.sum().backward()
    assert torch.equal(prediction.grad[0, :, :, 0], torch.zeros(4, 3))
    assert (prediction.grad[0, :, :, 1:] != 0).all() and (prediction.grad[1] != 0).all()
    torch.testing.assert_close(loss[1], per_sample_mse(prediction[1:], target[1:])[0])
    torch.testing.assert_close(loss[0], per_sample_mse(prediction[:1, :, :, 1:],
                                                       target[:1, :, :, 1:])[0])
    # a floor lets the masked-out area train a little
    prediction.grad = None
    per_sample_loss(prediction, batch, mask_floor=0.1).sum().backward()
    assert (prediction.grad[0, :, :, 0] != 0).all()
    # a sample masked out entirely has loss 0, not nan
    assert float(masked_mse(prediction[:1].detach(), target[:1], torch.zeros(1, 1, 3, 3))) == 0.0


@pytest.mark.parametrize("settings, message", [
    ({"train": {"mode_scale": 1.0}}, "mode_scale = 1.0 is read only with timestep_sampling = 'mode'"),
    ({"train": {"timestep_sampling": "uniform", "logit_normal_std": 2.0}},
     "logit_normal_std = 2.0 is read only"),
    ({"train": {"timestep_sampling": "cosmap", "uniform_timestep_fraction": 0.5}},
     "uniform_timestep_fraction"),
    ({"train": {"masked_loss_floor": 0.1}}, "masked_loss_floor needs \\[data\\] use_masks"),
    ({"train": {"timestep_sampling": "sigmoid"}}, "must be one of"),
    ({"train": {"timestep_shift": 0}}, "must be > 0"),
])
def test_options_that_would_be_ignored_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        build_config(settings)


def test_describe_objective_names_the_options():
    config = build_config({"train": {"timestep_sampling": "mode", "mode_scale": 0.5,
                                     "timestep_shift": 3.0, "loss_weighting": "cosmap",
                                     "masked_loss_floor": 0.2}, "data": {"use_masks": True}})
    text = describe_objective(config.train, 3, 10)
    assert text == {"timesteps": "mode (scale 0.5), shifted by a fixed 3",
                    "loss_weighting": "cosmap",
                    "loss_mask": "3 of 10 images masked, masked-out areas weigh 0.2"}
    assert "loss_mask" not in describe_objective(build_config({}).train)
