"""The quick seeded GGUF fuzz run of the default test suite: 500 mutated files, each loaded and run in a forked
child with a time and memory cap (tests/fuzz/gguf_fuzz.py); `make fuzz` runs 10,000."""

from __future__ import annotations

from tests.fuzz.gguf_fuzz import KINDS, fuzz


def test_quick_fuzz_run_has_no_crash_hang_overcap_or_foreign_exception(tmp_path):
    res = fuzz(500, seed=20261127, workdir=str(tmp_path))
    counts = res["counts"]
    print(counts, res["seconds"])
    assert sum(counts.values()) == 500
    bad = {k: counts[k] for k in ("foreign", "signal", "hang", "overcap")}
    assert not any(bad.values()), (bad, res["examples"][:5])
    assert counts["clean"] > 100 and counts["success"] > 10  # both sides of the line are exercised
    assert {key.split("/")[0] for key in res["by_kind"]} == set(KINDS)
