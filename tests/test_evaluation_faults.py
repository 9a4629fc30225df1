"""`xtalgen evaluate` under bad input: what cannot be read or computed is a row with a reason, the
rest is evaluated, and large structures are relaxed only on request.

Through the real command line on folders of CIFs made from real Perov-5 structures. The relaxing
tests use CHGNet for 3 optimizer steps on 5-atom cells, so they stay fast on a CPU.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pandas as pd
import pytest
from pymatgen.core import Structure

from xtalgen.cli import main

# A CIF exactly as a broken generator might write it: one species that is no element.
XX_CIF = """data_bad
_cell_length_a 4.0
_cell_length_b 4.0
_cell_length_c 4.0
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 90
_symmetry_space_group_name_H-M 'P 1'
loop_
_atom_site_type_symbol
_atom_site_label
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
Xx Xx1 0 0 0
Na Na1 0.5 0.5 0.5
"""

# Na and Cl on the same position: pymatgen merges them into one site and then refuses the file.
OVERLAP_CIF = XX_CIF.replace("data_bad", "data_overlap").replace("Xx Xx1 0 0 0", "Cl Cl1 0.5 0.5 0.5")

GARBAGE = bytes(range(256)) * 4  # NUL and non-UTF-8 bytes, as a truncated binary download


@pytest.fixture(scope="module")
def perov(perov_val) -> list[Structure]:
    frame = pd.read_csv(perov_val, nrows=3)
    return [Structure.from_str(cif, fmt="cif") for cif in frame["cif"]]


def _folder(path, perov, *names, **texts):
    """A folder of CIFs: good0..good{n-1} from `perov`, then the named texts (str or bytes)."""
    path.mkdir()
    for name in names:
        index = int(name.removeprefix("good"))
        perov[index].to(filename=str(path / f"{name}.cif"))
    for name, content in texts.items():
        target = path / f"{name}.cif"
        target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
    return path


def _table(out):
    return pd.read_csv(out / "per_structure.csv", dtype=str, keep_default_na=False).set_index("id")


def test_unreadable_structures_are_rows_with_reasons_and_the_rest_is_evaluated(perov, tmp_path):
    source = _folder(tmp_path / "cifs", perov, "good0", "good1", "good2",
                     unknown=XX_CIF, garbage=GARBAGE, overlap=OVERLAP_CIF)
    out = tmp_path / "eval"
    result = subprocess.run([sys.executable, "-m", "xtalgen.cli", "evaluate", str(source), "--out", str(out),
                             "--no-relax", "--no-plots", "--no-progress"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    table = _table(out)
    assert sorted(table.index) == ["garbage", "good0", "good1", "good2", "overlap", "unknown"]
    assert table.loc["unknown", "not_evaluated"] == "unknown_element"
    assert "'Xx' is not a chemical element" in table.loc["unknown", "not_evaluated_detail"]
    assert table.loc["garbage", "not_evaluated"] == "bad_encoding"
    for name in ("good0", "good1", "good2"):
        assert table.loc[name, "not_evaluated"] == "" and table.loc[name, "valid"] == "True"
    # The overlapping atoms are read as written (not merged away) and judged: too close, invalid.
    assert table.loc["overlap", "not_evaluated"] == ""
    assert table.loc["overlap", "num_atoms"] == "2" and float(table.loc["overlap", "min_distance"]) == 0.0
    assert table.loc["overlap", "struct_valid"] == "False" and "apart" in table.loc["overlap", "struct_reason"]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["num_structures"], summary["evaluated_count"], summary["not_evaluated_count"]) == (6, 4, 2)
    assert summary["not_evaluated_reasons"] == {"bad_encoding": 1, "unknown_element": 1}
    assert summary["valid_rate"] == pytest.approx(3 / 6)  # the rates keep the failures in the denominator
    assert result.stdout.startswith("evaluated 4 of 6 structures")
    assert "not evaluated 2 (bad_encoding 1, unknown_element 1;" in result.stdout


def test_a_folder_of_only_bad_files_is_a_summary_with_none_evaluated(tmp_path, capsys):
    # Consistent with a folder of unparsable samples: the files are there, so this is a result
    # (nothing could be evaluated), not an empty input (which is a one-line error, exit 2).
    source = _folder(tmp_path / "cifs", [], unknown=XX_CIF, garbage=GARBAGE, broken="data_x\n_cell_length_a 3\n")
    out = tmp_path / "eval"
    assert main(["evaluate", str(source), "--out", str(out), "--no-relax", "--no-plots", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["num_structures"], summary["evaluated_count"]) == (3, 0)
    assert summary["not_evaluated_reasons"] == {"bad_encoding": 1, "unknown_element": 1, "unparsable": 1}
    assert summary["valid_rate"] == 0.0 and summary["unique_rate"] == 0.0
    assert capsys.readouterr().out.startswith("evaluated 0 of 3 structures")


def test_relaxation_skips_oversized_structures_isolates_failures_and_shows_steps(perov, shared_data, tmp_path,
                                                                                 capsys):
    big = perov[0].copy()
    big.make_supercell([5, 4, 4])  # 400 atoms: minutes of CHGNet on a CPU
    fermium = perov[1].copy()
    fermium.replace(0, "Fm")  # Z = 100: beyond CHGNet's 94 elements, its model call fails
    source = _folder(tmp_path / "cifs", perov, "good0", "good2", unknown=XX_CIF)
    big.to(filename=str(source / "big.cif"))
    fermium.to(filename=str(source / "fermium.cif"))
    out = tmp_path / "eval"
    elemental = shared_data / "mp_reference" / "mp_elemental_reference_entries.json.gz"
    # Stability is assessed (against the elements) so that "never stable" is a checked answer.
    code = main(["evaluate", str(source), "--out", str(out), "--no-plots", "--allow-elements-only-hull",
                 "relax_steps=3", f"elemental_reference={elemental}"])
    captured = capsys.readouterr()
    assert code == 0
    table = _table(out)
    assert table.loc["big", "num_atoms"] == "400" and table.loc["big", "relaxed"] == ""
    assert table.loc["big", "relax_error"] == "not relaxed: 400 atoms > 200 (pass --max-relax-atoms 400 to relax)"
    assert table.loc["big", "relax_failure"] == "too many atoms" and table.loc["big", "stable"] == "False"
    # Fermium fails in the batch it shares with the good structures, and fails alone.
    assert table.loc["fermium", "relax_failure"] == "RuntimeError"
    for name in ("good0", "good2"):
        assert table.loc[name, "relaxed"] == "True" and table.loc[name, "relax_steps"] == "3"
    assert table.loc["unknown", "relax_failure"] == "unknown_element"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["relaxed_count"] == 2
    assert summary["relax_failure_reasons"] == {"RuntimeError": 1, "too many atoms": 1, "unknown_element": 1}
    assert summary["stability_assessed"] is True
    # The progress bar shows relaxation steps, not only finished structures.
    steps = [int(n) for n in re.findall(r"relaxing good\d \(5 atoms\): step (\d)/3", captured.err)]
    assert steps and steps[-1] == 3, captured.err[-500:]


def test_a_rerun_with_a_larger_limit_relaxes_just_the_skipped_structures(perov, tmp_path, capsys):
    source = _folder(tmp_path / "cifs", perov, "good0", "good1")
    out = tmp_path / "eval"
    args = ["evaluate", str(source), "--out", str(out), "--no-plots", "--no-progress", "relax_steps=2"]
    assert main([*args, "--max-relax-atoms", "4"]) == 0
    table = _table(out)
    assert list(table["relax_failure"]) == ["too many atoms"] * 2
    assert table.loc["good0", "relax_error"] == "not relaxed: 5 atoms > 4 (pass --max-relax-atoms 5 to relax)"
    assert main(args) == 0  # the default limit (200) allows them: only they are done again
    assert list(_table(out)["relaxed"]) == ["True", "True"]
    assert len((out / "per_structure.jsonl").read_text().splitlines()) == 4
    capsys.readouterr()
    assert main([*args, "--max-relax-atoms", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "evaluate.max_relax_atoms" in err and "Traceback" not in err
