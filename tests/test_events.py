"""colabkit.events: log lines -> step / loss / checkpoint events, defaults and configured regexes."""
from __future__ import annotations

import math

import pytest

from colabkit.config import load_config
from colabkit.errors import ConfigError
from colabkit.events import Detector, LineParser


def kinds(parser: LineParser, line: str) -> list[tuple[str, dict]]:
    return [(e.kind, dict(e.values)) for e in parser.parse(line)]


@pytest.mark.parametrize("line, expected", [
    ("step 20 loss 0.5", [("step", {"step": 20}), ("loss", {"loss": 0.5})]),
    ("iter 5/100 loss=nan", [("step", {"step": 5, "total": 100}), ("loss", {"loss": math.nan})]),
    ("Epoch 1 global_step=300 loss: 4.1e-01", [("step", {"step": 300}), ("loss", {"loss": 0.41})]),
    ("iteration: 42", [("step", {"step": 42})]),
    ("saved checkpoint at iteration 100 to ck/v01_step_00000100.pt",
     [("checkpoint", {"step": 100, "path": "ck/v01_step_00000100.pt"}), ("step", {"step": 100})]),
    ("Saving checkpoint for step 7 to /content/ck/x.pt.", [("checkpoint", {"step": 7, "path": "/content/ck/x.pt"}),
                                                            ("step", {"step": 7})]),
    # not progress: rates, file names, option names, words that merely contain the keywords
    ("12.5 steps/s", []),
    ("wrote v01_step_00000100.pt", []),
    ("--steps 100", []),
    ("lossy compression at stepper 3", []),
    ("nothing here", []),
])
def test_default_detectors(line, expected):
    got = kinds(LineParser(), line)
    assert [k for k, _ in got] == [k for k, _ in expected]
    for (_, g), (_, e) in zip(got, expected):
        assert g.keys() == e.keys()
        for k in e:
            assert (math.isnan(g[k]) and math.isnan(e[k])) if isinstance(e[k], float) and math.isnan(e[k]) \
                else g[k] == e[k]


def test_event_fields():
    (ck, st) = LineParser().parse("saved checkpoint at iteration 100 to ck/a.pt\n", now=5.0)
    assert (ck.step, ck.path, ck.loss, ck.time, ck.line) == (100, "ck/a.pt", None, 5.0, "saved checkpoint at iteration 100 to ck/a.pt")
    assert ck.as_dict() == {"kind": "checkpoint", "values": {"step": 100, "path": "ck/a.pt"},
                            "line": "saved checkpoint at iteration 100 to ck/a.pt", "time": 5.0}


def test_configured_regexes_replace_the_defaults(tmp_path):
    (tmp_path / "colabkit.yaml").write_text(
        "train:\n"
        "  step_regex: 'it=(?P<step>\\d+)'\n"
        "  loss_regex: 'L=([0-9.]+)'\n"          # no named group: the first group is the loss
        "  checkpoint_regex: 'ckpt (?P<path>\\S+) @ (?P<step>\\d+)'\n")
    p = LineParser(load_config(tmp_path / "colabkit.yaml"))
    assert kinds(p, "it=12 L=0.25") == [("step", {"step": 12}), ("loss", {"loss": 0.25})]
    assert kinds(p, "ckpt out/a.pt @ 12") == [("checkpoint", {"path": "out/a.pt", "step": 12})]
    assert kinds(p, "step 5 loss 1.0") == []  # the defaults are replaced, not added


def test_invalid_regex_errors():
    with pytest.raises(ConfigError, match=r"^step regex: '\(' is not a valid regular expression \(missing \), "
                                          r"unterminated subpattern at position 0\)$"):
        Detector("step", "(")


def test_invalid_regex_in_config(tmp_path):
    (tmp_path / "colabkit.yaml").write_text("train:\n  loss_regex: 'loss ([0-9'\n")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "colabkit.yaml")
    assert str(e.value) == ("train.loss_regex: 'loss ([0-9' is not a valid regular expression "
                            "(unterminated character set at position 6)")


def test_custom_detector_for_triggers():
    d = Detector("eval", r"eval acc (?P<acc>[0-9.]+) at (?P<step>\d+)")
    ev = d.match("eval acc 0.91 at 300")
    assert (ev.kind, dict(ev.values), ev.step) == ("eval", {"acc": 0.91, "step": 300}, 300)
    assert d.match("train loss 1") is None
    p = LineParser(extra=[d])
    assert [e.kind for e in p.parse("step 3: eval acc 0.5 at 3")] == ["step", "eval"]
    assert [e.kind for e in p.parse("eval acc 0.5 at 3")] == ["eval"]  # extra detectors see every line
