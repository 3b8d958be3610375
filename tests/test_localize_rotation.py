import numpy as np
import pytest

from tomoloc.localize.rotation import profile_interval


def bump(n, lo, hi, low=0.25, high=0.9):
    p = np.full(n, low)
    p[lo:hi] = high
    return p


def test_clean_bump():
    iv = profile_interval(bump(60, 20, 41), sigma=0, extend=0)
    assert (iv.lo, iv.hi, iv.found) == (20, 41, True)
    assert 0.25 < iv.threshold < 0.9 and iv.contrast == pytest.approx(0.65)


def test_noisy_bump_recovered_within_a_slice():
    rng = np.random.default_rng(0)
    p = bump(80, 25, 55) + rng.normal(0, 0.08, 80)
    iv = profile_interval(p, sigma=1.0)
    assert abs(iv.lo - 25) <= 1 and abs(iv.hi - 55) <= 1


def test_two_bumps_far_apart_are_both_kept_unless_asked_for_the_strongest():
    p = bump(100, 10, 20)  # the sample's less certain end, or debris
    p[50:85] = 0.9  # the sample's stronger part
    iv = profile_interval(p, sigma=0, extend=0)  # keep=0: every run above the threshold
    assert (iv.lo, iv.hi) == (10, 85)
    iv = profile_interval(p, sigma=0, extend=0, keep=1.0)  # the strongest run alone
    assert (iv.lo, iv.hi) == (50, 85)
    # keep=0.5: runs of at least half the strongest's mass; the first has 10/35 of it.
    assert profile_interval(p, sigma=0, extend=0, keep=0.5).lo == 50
    assert profile_interval(p, sigma=0, extend=0, keep=0.25).lo == 10


def test_two_bumps_with_a_short_gap_are_merged():
    p = bump(100, 30, 50)
    p[53:70] = 0.9  # a gap of 3 slices (< 5% of 100): one sample with a weak middle
    iv = profile_interval(p, sigma=0, max_gap=0.05)
    assert (iv.lo, iv.hi) == (30, 70)


def test_sample_touching_the_border():
    iv = profile_interval(bump(50, 0, 18), sigma=0)
    assert (iv.lo, iv.hi) == (0, 18)
    iv = profile_interval(bump(50, 30, 50), sigma=0)
    assert (iv.lo, iv.hi) == (30, 50)


def test_flat_profile_keeps_whole_axis():
    rng = np.random.default_rng(1)
    iv = profile_interval(0.5 + rng.normal(0, 0.01, 40))
    assert (iv.lo, iv.hi, iv.found) == (0, 40, False)


def test_hysteresis_keeps_half_certain_edge_slices():
    p = bump(60, 20, 40)
    p[16:20] = p[40:43] = 0.4  # edge slices: above background, not above Otsu's threshold
    assert (profile_interval(p, sigma=0, extend=0).lo, profile_interval(p, sigma=0, extend=0).hi) == (20, 40)
    iv = profile_interval(p, sigma=0, extend=0.5)  # low level = midway between threshold and 0.25
    assert (iv.lo, iv.hi) == (16, 43)
    iv = profile_interval(p + 0.0, sigma=0, extend=1.0)
    assert (iv.lo, iv.hi) == (16, 43)  # never past the background level itself


def test_floor_keeps_a_sample_through_the_whole_axis():
    # No background slice: the sample spans the axis, less certain towards one end (a cone's
    # tip). Otsu's threshold on the profile alone splits the sample and cuts the tip.
    p = np.linspace(0.9, 0.5, 64)
    assert profile_interval(p, sigma=0).hi < 60
    iv = profile_interval(p, sigma=0, floor=0.25)
    # threshold = min(Otsu, (0.25 + p90) / 2) = 0.55 (p90 = 0.85); low = 0.55 - (0.55 - 0.25) / 2 = 0.40
    assert iv.threshold == pytest.approx((0.25 + np.percentile(p, 90)) / 2)
    assert (iv.lo, iv.hi, iv.found) == (0, 64, True)


def test_floor_changes_nothing_where_the_background_is_at_chance():
    p = bump(60, 20, 41)
    assert (profile_interval(p, sigma=0, floor=0.25).lo, profile_interval(p, sigma=0, floor=0.25).hi) == (20, 41)
    flat = np.full(40, 0.9)  # certain everywhere: without a floor there is no contrast to trust
    assert profile_interval(flat, sigma=0).found is False
    iv = profile_interval(flat, sigma=0, floor=0.25)
    assert (iv.lo, iv.hi, iv.found) == (0, 40, True) and iv.contrast == pytest.approx(0.65)


def test_featureless_certainty_hand_computed():
    import torch

    from tomoloc.localize.rotation import featureless_certainty
    from tomoloc.sampling import inscribed_circle_mask

    class Bright(torch.nn.Module):
        """logit of angle 0 = the reference slice's mean; the other three 0."""

        def forward(self, ref, twin):
            m = ref.mean(dim=(1, 2, 3))
            return torch.stack([m, 0 * m, 0 * m, 0 * m], dim=1)

    like = np.full((5, 20, 24), 2.0, np.float32)  # no noise: every featureless slice is 2.0
    like[0, 0, 0] = 2.5  # the median stays 2.0
    mean = 2.0 * inscribed_circle_mask(16, 16).mean()  # resized to 16 x 16, masked by the circle
    want = np.exp(mean) / (np.exp(mean) + 3)
    assert featureless_certainty(Bright(), like, input_size=16, n=4) == pytest.approx(want, rel=1e-5)
