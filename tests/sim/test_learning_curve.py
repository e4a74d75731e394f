"""Rolling means and settling times of learning curves."""

from __future__ import annotations

import math

import numpy as np
import pytest

from isthmus.sim.learning_curve import rolling_mean, tail_level, time_to_within


def test_rolling_mean_averages_the_requests_of_each_window_by_arrival():
    arrival = np.array([3.0, 0.0, 1.0, 2.0, 4.0])  # any order
    ttft = np.array([4.0, 1.0, 2.0, 3.0, 5.0])
    t, m = rolling_mean(arrival, ttft, window_s=2.0, step_s=1.0)
    assert t.tolist() == [2.0, 3.0, 4.0]
    assert m.tolist() == [2.5, 3.5, 4.5]  # (0, 2] -> 2, 3 ; (1, 3] -> 3, 4 ; (2, 4] -> 4, 5
    assert rolling_mean(arrival, ttft, window_s=10.0)[0].size == 0
    with pytest.raises(ValueError):
        rolling_mean(arrival, ttft, window_s=0.0)


def test_tail_level_and_time_to_within():
    arrival = np.arange(100.0)
    ttft = np.where(arrival < 40, 2.0, 1.0)
    assert tail_level(arrival, ttft) == 1.0
    t, m = rolling_mean(arrival, ttft, window_s=10.0, step_s=1.0)
    # the window holds only settled requests from t = 49 on (arrivals 40..49)
    assert time_to_within(t, m, 1.0, tol=0.05) == 49.0
    assert time_to_within(t, m, 1.0, tol=0.05, after_s=60.0) == 60.0
    assert math.isnan(time_to_within(t, m, 0.5))
