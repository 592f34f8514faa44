"""The stage breakdown of a load run as a PNG."""

from loupe.traces.plot import plot
from loupe.traces.reader import read_files
from loupe.traces.requests import all_requests


def test_a_png_with_a_bar_per_request_that_succeeded(load_run, tmp_path):
    path, _ = load_run
    out = tmp_path / "stages.png"
    assert plot(all_requests(read_files([path]).traces), str(out)) == 4
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
