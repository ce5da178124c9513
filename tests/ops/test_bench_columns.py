"""The admission and soak benchmarks print columns of the rows `summarise` builds: the soak
table's columns are derived from the admission table's, so both must name real row keys."""

from __future__ import annotations

from ops.bench import admission, soak
from ops.bench.admission import Result, summarise


def test_every_printed_column_is_a_key_of_the_summarised_rows():
    """A column missing from the rows prints as '-' forever, silently; each one must exist."""
    results = [
        Result("priority", 200, ttft_s=1.0, e2e_s=2.0, engine_s=0.5, queue_s=0.1),
        Result("priority", 418),
    ]
    (row,) = summarise("soak", results, reference_p99=0.5)
    assert set(admission.COLUMNS) <= row.keys()
    assert set(soak.COLUMNS) <= row.keys()
    assert row["other_status"] == [418]
    assert row["p99_vs_unloaded"] == 2.0
