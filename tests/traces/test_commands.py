"""`loupe traces ...` from the command line."""

import json

import pytest

from loupe.cli import main


def test_summary_as_json_and_as_tables(load_run, capsys):
    path, _ = load_run
    main(["traces", "summary", path, "--json", "--slowest", "1"])
    result = json.loads(capsys.readouterr().out)
    assert result["overall"]["requests"] == 5 and result["traces"] == 5
    assert result["slowest"][0]["rid"] == "d"
    main(["traces", "summary", path, "--slowest", "1"])
    out = capsys.readouterr().out
    assert "All requests: 5 requests, 1 errors" in out and "share of e2e" in out and "decode 300.0 ms (70%)" in out


def test_show_export_and_plot_write_what_they_say(load_run, tmp_path, capsys):
    path, _ = load_run
    main(["traces", "show", "d", path])
    assert "Req d /v1/completions" in capsys.readouterr().out
    main(["traces", "export", path, "--format", "perfetto", "-o", str(tmp_path / "p.json"), "--trace-id", "a"])
    assert {e["args"]["rid"] for e in json.loads((tmp_path / "p.json").read_text())["traceEvents"]
            if e["ph"] == "X" and "rid" in e["args"]} == {"a"}
    main(["traces", "plot", path, "-o", str(tmp_path / "p.png")])
    assert "wrote" in capsys.readouterr().out and (tmp_path / "p.png").stat().st_size > 0


def test_mistakes_get_one_line(load_run, tmp_path):
    path, _ = load_run
    with pytest.raises(SystemExit, match="no such file: nope.jsonl"):
        main(["traces", "summary", "nope.jsonl"])
    with pytest.raises(SystemExit, match="loupe traces show: no traces match 'zz'"):
        main(["traces", "show", "zz", path])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SystemExit, match="no spans in"):
        main(["traces", "summary", str(tmp_path / "empty.jsonl")])
