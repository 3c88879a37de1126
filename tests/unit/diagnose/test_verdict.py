"""verdict.decide: the one verdict line and exit status of `torchdiag check` and `torchdiag summarize`."""

from __future__ import annotations

from torchdiag._diagnose.verdict import ERROR, FLAGGED, OK, decide
from torchdiag._report.report import STATUSES
from torchdiag.cli import _check_cli as check_cli
from torchdiag.cli import _summarize as summarize


def test_a_problem_in_fail_on_fails():
    v = decide({"dead", "vanishing"}, STATUSES, verb="found", where="at step 2", layers=["a", "b"])
    assert (v.status, v.line, v.problems, v.layers) == (FLAGGED, "FAIL: vanishing, dead found at step 2",
                                                         ["vanishing", "dead"], ["a", "b"])
    assert v.found == ["vanishing", "dead"]  # STATUSES order, whatever order they came in


def test_problems_outside_fail_on_pass_and_say_so():
    v = decide({"vanishing"}, {"dead", "nonfinite"}, verb="flagged", layers=["a"])
    assert (v.status, v.problems, v.found, v.layers) == (OK, [], ["vanishing"], ["a"])
    assert v.line == "OK: vanishing flagged, not in --fail-on (nonfinite, dead)"


def test_nothing_found():
    v = decide(set(), STATUSES, verb="found", where="in the run (steps 0..3 (4 recorded))", layers=["ignored"])
    assert (v.status, v.line, v.problems, v.layers, v.found) == (
        OK, "OK: nothing found in the run (steps 0..3 (4 recorded))", [], [], [])


def test_check_and_summarize_share_the_exit_statuses():
    assert (OK, FLAGGED, ERROR) == (0, 1, 2)
    assert (check_cli.OK, check_cli.FLAGGED, check_cli.ERROR) == (OK, FLAGGED, ERROR)
    assert (summarize.OK, summarize.FLAGGED, summarize.NO_DATA) == (OK, FLAGGED, ERROR)
