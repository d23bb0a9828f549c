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
