"""``dsv4 analyze`` end to end through ``dsv4.analysis.cli.main``: the acceptance ratios, the
JSON shape, the human report's explanation of both claims, checkpoint paths and the plot."""

from __future__ import annotations

import argparse
import builtins
import json
from pathlib import Path

import pytest

from dsv4.analysis.cli import main, parse_context
from dsv4.config import PRESETS


def _json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_acceptance_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    out = _json(capsys, "--model", "v4-pro", "--baseline", "v3.2", "--context", "1048576")
    assert 0.24 <= out["flops_ratio"] <= 0.30
    assert 0.085 <= out["kv_ratio"] <= 0.115
    assert out["kv_format"] == "fp8"


def test_json_shape(capsys: pytest.CaptureFixture[str]) -> None:
    out = _json(capsys, "--model", "v4-flash", "v4-pro", "v3", "--context", "128K")
    assert out["context"] == 131072 and out["baseline"] == "v3.2"
    assert out["first_model"] == "v4-flash"
    assert list(out["models"]) == ["v4-flash", "v4-pro", "v3", "v3.2"]
    for m in out["models"].values():
        assert isinstance(m["flops_per_token"], int) and m["flops_per_token"] > 0
        assert isinstance(m["kv_bytes_per_sequence"], int) and m["kv_bytes_per_sequence"] > 0
        assert sum(m["flops_breakdown"].values()) == m["flops_per_token"]
        assert sum(m["kv_breakdown"].values()) == m["kv_bytes_per_sequence"]
    flash, base = out["models"]["v4-flash"], out["models"]["v3.2"]
    assert out["flops_ratio"] == pytest.approx(flash["flops_per_token"] / base["flops_per_token"])
    assert out["kv_ratio"] == pytest.approx(
        flash["kv_bytes_per_sequence"] / base["kv_bytes_per_sequence"])
    assert {(c["model"], c["quantity"]) for c in out["claims"]} == {
        ("v4-pro", "flops"), ("v4-pro", "kv"), ("v4-flash", "flops"), ("v4-flash", "kv")}


def test_human_output_explains_both_claims(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", "v4-pro", "--baseline", "v3.2", "--context", "1M"]) == 0
    text = capsys.readouterr().out
    for needle in ("27.0%", "10.0%", "7.0%", "26.2%", "10.5%", "12.1%", "does NOT match",
                   "FLOPs ratios", "KV ratios", "2 per multiply-accumulate", "V3.2"):
        assert needle in text, needle


def test_checkpoint_path_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["v4-flash"].to_official_dict()))
    out = _json(capsys, "--model", str(tmp_path), "v4-flash")
    a, b = out["models"][str(tmp_path)], out["models"]["v4-flash"]
    assert a["flops_per_token"] == b["flops_per_token"]
    assert main(["--model", str(tmp_path / "nope")]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_parse_context() -> None:
    assert parse_context("1M") == 1 << 20
    assert parse_context("128k") == 131072
    assert parse_context("1_000") == 1000
    with pytest.raises(argparse.ArgumentTypeError):
        parse_context("lots")


def test_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "eff.png"
    assert main(["--plot", str(path), "--context", "64K"]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(path) in capsys.readouterr().out


def test_plot_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    real_import = builtins.__import__

    def fake_import(name: str, *args: object, **kwargs: object) -> object:
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    assert main(["--plot", str(tmp_path / "x.png")]) == 1
    assert "pip install 'dsv4[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
