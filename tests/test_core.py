import math

import numpy as np
import pytest

from xtalgen.batch import collate
from xtalgen.record import CrystalRecord, decode_record, encode_record
from xtalgen.schema import ConfigError, load_config


def _record(n=3, rid="a", **props):
    rng = np.random.default_rng(n)
    return CrystalRecord(
        id=rid,
        lattice=np.eye(3) * 4.0 + rng.normal(0, 0.1, (3, 3)),
        frac_coords=rng.random((n, 3)),
        atomic_numbers=rng.integers(1, 101, n),
        properties=props,
    )


def test_encoding_round_trip_is_exact():
    rec = _record(5, band_gap=1.25, space_group=221, chemical_system="O-Sr-Ti", nan=math.nan)
    back = decode_record(encode_record(rec))
    assert back.equals(rec)
    assert back.frac_coords.dtype == np.float64 and back.atomic_numbers.dtype == np.int64


def test_corrupt_bytes_raise_value_error():
    data = bytearray(encode_record(_record()))
    with pytest.raises(ValueError):
        decode_record(bytes(data[: len(data) // 2]))


def test_collate_flat_batch():
    recs = [_record(2, "a", g=1.0), _record(3, "b"), _record(4, "c", g=2.0)]
    batch = collate(recs, property_names=["g"])
    assert batch.num_atoms.tolist() == [2, 3, 4]
    assert batch.batch_index.tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert batch.lattice.shape == (3, 3, 3)
    assert batch.property_mask["g"].tolist() == [True, False, True]
    assert batch.properties["g"].tolist() == [1.0, 0.0, 2.0]


def test_config_unknown_key_and_wrong_type_name_the_key():
    with pytest.raises(ConfigError, match="train.max_stepz"):
        load_config(overrides=["train.max_stepz=3"])
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(overrides=["train.max_steps=many"])
    cfg = load_config(overrides=["train.max_steps=7", "model.score_net.hidden=64"])
    assert cfg.train.max_steps == 7 and cfg.model.score_net.hidden == 64
