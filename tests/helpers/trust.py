"""Can the diagnosis be trusted? One command over every calibration set: false alarms on healthy models and runs,
the broken cases' verdicts, and the lead time of each diverging run.

    python -m tests.helpers.trust [--out docs/trust.md]

It runs what the tests run (the Hugging Face zoo, the timm/torchvision families, the whole runs on real data, the
attention-logit forecast) and prints one Markdown page: the totals first, then a row per case. ``--out`` also
writes it to a file (``docs/trust.md`` is this page, as generated at the commit it was committed with).
"""

from __future__ import annotations

import argparse
import io
import sys
import time

import torch

from tests.helpers import families as fam
from tests.helpers import real_zoo
from tests.helpers import runs as whole_runs

_FAMILY_COMBOS = [("adamw", True, "smooth"), ("adamw", False, "smooth"), ("sgd", True, "smooth"),
                  ("adamw", True, "white")]
_OPTIMISATION = ("learning rate", "warm-up", "warm it up", "clip")


def _zoo(out: list[str]) -> tuple[int, int, int, int]:
    """Hugging Face zoo: (healthy runs, false alarms, broken runs, wrong verdicts)."""
    healthy = alarms = broken = wrong = 0
    for case in real_zoo.CASES:
        for opt in ("adamw", "sgd"):
            for passed in (True, False):
                if not case.healthy and "large_updates" in case.expect and not passed:
                    continue  # an update ratio is measured with optimizer= only
                res = real_zoo.run(case, opt, steps=3, pass_optimizer=passed)
                if case.healthy:
                    healthy += 1
                    bad = bool(res["fired"] or res["warnings"])
                    alarms += bad
                    verdict = "false alarm: " + str(res["fired"]) if bad else "silent"
                else:
                    broken += 1
                    why = real_zoo.verdict(case, opt, res["fired"])
                    wrong += why is not None
                    verdict = why or f"right: {res['fired']}"
                out.append(f"| {case.name} | {opt} | {'yes' if passed else 'no'} | {verdict} |")
    return healthy, alarms, broken, wrong


def _families(out: list[str]) -> tuple[int, int]:
    """timm / torchvision at their own init: (healthy runs and checks, false alarms)."""
    runs = alarms = 0
    for case in fam.HEALTHY:
        for opt, passed, kind in _FAMILY_COMBOS:
            res = fam.train(case, opt, passed, kind, steps=4)
            runs += 1
            bad = bool(res.warnings or res.findings)
            alarms += bad
            said = (fam.describe(res.findings) or " || ".join(res.warnings))[:240] if bad else "silent"
            out.append(f"| {case.name} | {opt} | {'yes' if passed else 'no'} | {kind} | {said} |")
        report, msgs = fam.check(case)
        runs += 1
        alarms += bool(report.flagged or msgs)
        flagged = [(layer.name, sorted(layer.status)) for layer in report.flagged]
        out.append(f"| {case.name} | check() | - | smooth | {flagged or 'silent'} |")
    return runs, alarms


def _runs(out: list[str]) -> tuple[int, int, int, int, list[int]]:
    """Whole runs on real data: (healthy runs, false alarms, diverging runs, late or wrong-cause, lead times)."""
    healthy = alarms = diverging = late = 0
    leads: list[int] = []
    for case in whole_runs.HEALTHY + whole_runs.DIVERGING:
        r = whole_runs.run(case)
        if case in whole_runs.HEALTHY:
            healthy += 1
            told_init_only = r.findings and {f.reason for f in r.findings} == {"init"} and all(
                f.first_step == 0 for f in r.findings)
            bad = bool(r.warnings) and not told_init_only
            alarms += bad
            said = "silent" if not r.warnings else ("told its init at step 0" if told_init_only else
                                                     "false alarm: " + whole_runs.describe_findings(r, 200))
            out.append(f"| {case.name} | {r.metric:.3f} | - | - | - | {said} |")
        else:
            diverging += 1
            first = r.warnings[0].text if r.warnings else ""
            right = bool(r.warnings) and r.first_warning_step <= r.divergence_step and any(
                k in first for k in _OPTIMISATION)
            late += not right
            if r.lead is not None:
                leads.append(r.lead)
            out.append(f"| {case.name} | {r.metric:.3f} | {r.divergence_step} | {r.first_warning_step} | {r.lead} | "
                       f"{'right' if right else 'late or wrong cause'}: {first[:160]} |")
    return healthy, alarms, diverging, late, leads


def _forecast(out: list[str]) -> int | None:
    """The attention-logit forecast of the scenario test: steps between the warning and the crossing."""
    import torchdiag
    from tests.helpers.forecast import growing_attention

    threshold = torchdiag.Config.defaults().attention_logit_max
    logits, said, _ = growing_attention()
    crossed = next((i for i, v in enumerate(logits) if v > threshold), None)
    if not said or crossed is None:
        out.append("| attention logit x1.25 a step | - | no forecast |")
        return None
    f = said[0]
    out.append(f"| attention logit x1.25 a step | step {f.step}: ~{f.steps_to_go:.0f} steps to go | crossed at step"
               f" {crossed} ({crossed - f.step} steps later) |")
    return crossed - f.step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the page to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    zoo_rows: list[str] = []
    fam_rows: list[str] = []
    run_rows: list[str] = []
    fc_rows: list[str] = []
    zh, za, zb, zw = _zoo(zoo_rows)
    fh, fa = _families(fam_rows)
    rh, ra, rd, rl, leads = _runs(run_rows)
    lead = _forecast(fc_rows)
    page = io.StringIO()
    w = page.write
    w("# Trust: false alarms, verdicts and lead times\n\n")
    w("Generated by `python -m tests.helpers.trust --out docs/trust.md` (CPU, one thread); the tests assert the"
      " same cases (`tests/scenarios/test_real_zoo.py`, `test_families.py`, `test_whole_runs.py`,"
      " `test_trusted_runs.py`).\n\n")
    w("| set | healthy runs | false alarms | broken / diverging | wrong, late or missed |\n"
      "| --- | --- | --- | --- | --- |\n")
    w(f"| Hugging Face zoo (3 steps, AdamW and SGD, with and without `optimizer=`) | {zh} | {za} | {zb} | {zw} |\n")
    w(f"| timm / torchvision at their own init (4 steps, and `check()`) | {fh} | {fa} | - | - |\n")
    w(f"| whole runs on real data (digits, CPython's sources) | {rh} | {ra} | {rd} | {rl} |\n\n")
    if leads:
        w(f"Lead times of the diverging runs (divergence step minus first warning): {sorted(leads)}.\n")
    if lead is not None:
        w(f"Steps-to-divergence forecast: warned {lead} steps before the attention logit crossed its threshold.\n")
    w("\n## Hugging Face zoo\n\n| case | optimizer | optimizer= | verdict |\n| --- | --- | --- | --- |\n")
    w("\n".join(zoo_rows) + "\n")
    w("\n## timm / torchvision\n\n| case | optimizer | optimizer= | input | verdict |\n"
      "| --- | --- | --- | --- | --- |\n")
    w("\n".join(fam_rows) + "\n")
    w("\n## Whole runs\n\n| run | held-out | divergence step | first warning | lead | verdict |\n"
      "| --- | --- | --- | --- | --- | --- |\n")
    w("\n".join(run_rows) + "\n")
    w("\n## Forecast\n\n| scenario | forecast | outcome |\n| --- | --- | --- |\n")
    w("\n".join(fc_rows) + "\n")
    text = page.getvalue()
    sys.stdout.write(text)
    print(f"\n({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
