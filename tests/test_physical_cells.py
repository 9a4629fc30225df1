"""Sampled cells outside the physical band around the prior's volume per atom are flagged and counted."""

from __future__ import annotations

import json

import pytest
from pymatgen.core import Lattice, Structure

from xtalgen.sampling.driver import PHYSICAL_BAND_FACTOR, batch_rows, physical_band
from xtalgen.sampling.plan import SamplingPlan
from xtalgen.schema import SampleConfig


def _cubic(edge: float) -> Structure:
    return Structure(Lattice.cubic(edge), ["Sr", "Ti", "O", "O", "O"],
                     [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])


def test_band_is_the_prior_volume_times_and_over_the_factor():
    low, high = physical_band(0.05)  # 20 Å^3 per atom
    assert low == pytest.approx(20 / PHYSICAL_BAND_FACTOR) and high == pytest.approx(20 * PHYSICAL_BAND_FACTOR)


def test_rows_carry_volume_per_atom_and_the_physical_flag():
    plan = SamplingPlan(num_samples=3, batch_size=3)
    # 3.9 Å perovskite: 11.9 Å^3/atom (physical); x4 and x0.3 the edge: blown up, collapsed
    structures = [_cubic(3.9), _cubic(15.6), _cubic(1.17)]
    rows = batch_rows(plan, 0, SampleConfig(), {}, structures, physical_band(1 / 12.0))
    assert [row["physical_cell"] for row in rows] == [True, False, False]
    assert rows[0]["volume_per_atom"] == pytest.approx(3.9**3 / 5, rel=1e-4)
    assert rows[1]["volume_per_atom"] == pytest.approx(15.6**3 / 5, rel=1e-4)
    json.dumps(rows)  # plain JSON types (bool, float), as samples.jsonl needs
    assert "physical_cell" not in batch_rows(plan, 0, SampleConfig(), {}, structures)[0]  # no band given
