import json
import stat

from lorsbench.records import write_json_atomic


def test_atomic_json_is_whole_and_readable_by_others(tmp_path):
    target = tmp_path / "run.json"
    write_json_atomic(target, {"status": "success", "x": float("nan")})
    write_json_atomic(target, {"status": "failed"})  # replaces, never appends
    assert json.loads(target.read_text()) == {"status": "failed"}
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temporary file left behind
