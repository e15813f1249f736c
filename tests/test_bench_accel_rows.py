"""bench_accel's rows: the fewer-steps baseline takes any schedule length named in --only, so an
equal-wall-clock comparison can pick the Karras schedule nearest a preset's time (BENCHMARKS.md,
"At 32 x 32 tokens per image")."""
import argparse

from bench.bench_accel import configurations


def _rows(only):
    return configurations(argparse.Namespace(tiny=False, sweep=False, percall_sweep=False, only=only))


def test_fewer_steps_row_of_any_length_named_in_only():
    rows = _rows("full,turbo4d-quality,fewer-steps-11,fewer-steps-10")
    assert [r["name"] for r in rows] == ["full", "turbo4d-quality", "fewer-steps-10", "fewer-steps-11"]
    by = {r["name"]: r for r in rows}
    assert by["fewer-steps-11"]["steps"] == 11 and by["fewer-steps-11"]["family"] == "fewer-steps"
    assert by["fewer-steps-10"]["steps"] == 10  # the built-in length is not doubled
    assert [r["name"] for r in _rows("full,fewer-steps-x")] == ["full"]  # not a length: no row
