"""metrics.jsonl holds each step once, also after a resume that trains steps again."""
import json

from ds_vicuna.train.metrics import MetricsLogger, drop_records_after


def steps(path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_a_resumed_run_replaces_the_steps_it_trains_again(tmp_path):
    path = tmp_path / "metrics.jsonl"
    first = MetricsLogger(tmp_path, enabled=True)
    for step in (1, 2, 3, 4, 5):
        first.log({"step": step, "loss": 1.0 / step})
    first.log({"step": 4, "eval_loss": 0.5})
    first.close()
    path.write_text(path.read_text() + '{"step": 6, "lo')  # a crash cut the last line short
    resumed = MetricsLogger(tmp_path, enabled=True, start_step=3)  # the checkpoint was step 3
    assert steps(path) == [1, 2, 3]
    for step in (4, 5, 6):
        resumed.log({"step": step, "loss": 0.1})
    resumed.close()
    assert steps(path) == [1, 2, 3, 4, 5, 6]


def test_drop_records_after_counts_and_leaves_a_clean_file_alone(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2)))
    before = path.stat().st_mtime_ns
    assert drop_records_after(path, 2) == 0 and path.stat().st_mtime_ns == before
    assert drop_records_after(path, 0) == 2 and path.read_text() == ""
    assert drop_records_after(tmp_path / "missing.jsonl", 0) == 0
