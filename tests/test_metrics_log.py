"""metrics.jsonl on resume: lines after the checkpoint dropped, damaged lines dropped with a word."""

import json

from aejax.runtime import writers


def test_truncation_keeps_lines_up_to_the_step_and_drops_damaged_ones(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "split": "train", "loss": float(s)} for s in (10, 20, 30)]
    good = [json.dumps(r).encode() + b"\n" for r in rows]
    path.write_bytes(good[0] + b"[1, 2]\n" + b'{"step": "x"}\n' + b"\xff\xfe{\n" + good[1]
                     + good[2] + b'{"step": 40, "spl')  # the last line cut short by a kill
    with caplog.at_level("WARNING"):
        writers.truncate_jsonl(str(path), 20)
    assert path.read_bytes() == good[0] + good[1]
    assert "Dropped 4 unreadable line(s)" in caplog.text and "line 2, 3, 4, 7" in caplog.text


def test_a_line_cut_short_by_a_kill_is_dropped_quietly(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 10, "loss": 1.0}\n{"step": 20, "lo')
    with caplog.at_level("WARNING"):
        writers.truncate_jsonl(str(path), 20)
    assert path.read_bytes() == b'{"step": 10, "loss": 1.0}\n'
    assert "unreadable" not in caplog.text
