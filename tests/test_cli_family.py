"""The command family: every flag has help, shared flags mean the same everywhere."""

from __future__ import annotations

import argparse

import pytest

from edge_runtime import methods
from edge_runtime.backends import CHOICES
from edge_runtime.outputs import JSON_METAVAR


def _parsers() -> dict[str, argparse.ArgumentParser]:
    from calibrate.cli import build_parser as calibrate
    from deploy.cli import build_parser as deploy
    from edge_runtime.cli.alerts import build_parser as alerts
    from edge_runtime.cli.run import build_parser as run
    from edge_runtime.data.data_cli import build_parser as data
    from edge_runtime.data.synth_cli import build_parser as synth
    from train.cli import build_parser as train
    from train.eval_cli import build_parser as evaluate

    out = {"edge-synth": synth(), "edge-data": data(), "edge-eval": evaluate(), "edge-calibrate": calibrate(),
           "edge-deploy": deploy(), "edge-run": run(), "edge-alerts": alerts()}
    for name in methods.names():
        out[f"edge-train --method {name}"] = train(name)
    return out


def _actions(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _actions(sub)
        elif not isinstance(action, argparse._HelpAction):
            yield action


PARSERS = _parsers()


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_flag_has_help(name):
    missing = [a.option_strings or a.dest for a in _actions(PARSERS[name]) if not (a.help or "").strip()]
    assert missing == [], f"{name}: flags without help: {missing}"


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_shared_flags_mean_the_same(name):
    by_flag = {opt: a for a in _actions(PARSERS[name]) for opt in a.option_strings}
    if "--json" in by_flag:
        assert by_flag["--json"].metavar == JSON_METAVAR and not by_flag["--json"].required, name
    if "--backend" in by_flag:
        assert set(CHOICES) <= set(by_flag["--backend"].choices or CHOICES), name
    if "--model" in by_flag:
        assert "store" in by_flag["--model"].help, f"{name}: --model must take a model-store name too"
    if "--modality" in by_flag:
        assert set(by_flag["--modality"].choices) == {"rgb", "3d", "rgb+3d"}, name
    if "--device" in by_flag:
        assert "cpu" in by_flag["--device"].help and "cuda" in by_flag["--device"].help, name
