"""The throughput model against BigScience's published runs (plan/published_runs.yaml): every run it claims,
fitted or held out, within 15% in seconds per iteration and TFLOP/s; the calibration the fit of its fitted
runs; docs/planner.md the table the code prints."""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import pytest
from omegaconf import OmegaConf

from bigscience_train.config import load_config
from bigscience_train.plan import published
from bigscience_train.plan.hardware import DEVICES
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def comparisons():
    return published.comparisons()


def test_every_claimed_run_is_within_15_percent_fitted_or_held_out(comparisons):
    claimed = [c for c in comparisons if c.claimed]
    misses = [
        f"{c.run.name}: {figure} {error:+.1%}"
        for c in claimed
        for figure, error in c.errors().items()
        if abs(error) > published.TOLERANCE
    ]
    assert not misses, "\n".join(misses)
    sets = defaultdict(int)
    for c in claimed:
        sets[c.run.device, c.run.fitted] += 1
    # Each device class: fitted on some runs, checked on others it was not fitted to.
    assert all(sets[device, fitted] >= 10 for device in ("v100", "a100") for fitted in (True, False)), sets
    names = {c.run.name for c in claimed}
    assert {"BLOOM-176B final", "tr1-13B 128 nodes (final)"} <= names
    assert any(c.run.name.startswith("tr8b-104B") and not c.run.fitted for c in claimed)


def test_runs_it_does_not_claim_say_why(comparisons):
    unclaimed = [c for c in comparisons if not c.claimed]
    assert unclaimed and all(c.run.excluded or c.problems for c in unclaimed)
    # The trainer rejects only the layouts whose layers do not split evenly over the stages.
    rejected = [c for c in comparisons if c.plan is None]
    assert rejected and all(
        len(c.problems) == 1 and "is not divisible by parallel.pp" in c.problems[0] for c in rejected
    )
    # Every published figure of a claimed run has a prediction beside it.
    assert all(c.errors() for c in comparisons if c.claimed)


def test_published_tflops_are_megatrons_counting_of_the_published_seconds(comparisons):
    """Runs that published TFLOP/s only are compared in that counting: BLOOM's log line pins it."""
    final = next(c for c in comparisons if c.run.name == "BLOOM-176B final")
    logged = final.plan.time.hardware_flops / (final.run.seconds * final.plan.world) / 1e12
    assert logged == pytest.approx(final.run.tflops, rel=2e-3)


def test_run_configs_are_what_load_config_gives(comparisons):
    firsts = {published._groups(c.run.overrides): c.run for c in comparisons}
    for run in firsts.values():
        assert OmegaConf.to_yaml(published.run_config(run.overrides)) == OmegaConf.to_yaml(
            load_config(list(run.overrides))
        ), run.name
    for c in comparisons:
        keys = [o.split("=")[0] for o in c.run.overrides]
        assert len(keys) == len(set(keys)), c.run.name  # one value a key, as a command line takes it


@pytest.mark.parametrize("device", sorted(published.FITTED))
def test_calibration_is_the_least_squares_fit_of_its_fitted_runs(device):
    calibration = DEVICES[device].calibration
    loss = published.fit_loss(device, calibration)
    for name in published.FITTED[device]:
        for factor in (0.99, 1.01):
            moved = published._with(calibration, name, published._value(calibration, name) * factor)
            assert published.fit_loss(device, moved) >= loss * (1 - 1e-3), (name, factor)


def test_refitting_from_a_moved_start_finds_the_calibration_again():
    calibration = DEVICES["v100"].calibration
    start = dataclasses.replace(calibration, max_efficiency=0.7, latency=1.2e-3)
    refit = published.fit_calibration("v100", start, tolerance=1e-5)
    assert published.fit_loss("v100", refit) < published.fit_loss("v100", start)
    for name in published.FITTED["v100"]:
        assert published._value(refit, name) == pytest.approx(published._value(calibration, name), rel=0.05)


def test_docs_table_is_the_one_the_code_prints(comparisons, capsys):
    assert published.main([]) == 0
    table = capsys.readouterr().out.strip()
    docs = (ROOT / "docs" / "planner.md").read_text()
    assert table in docs, "regenerate docs/planner.md: python -m bigscience_train.plan.published"
