"""Zero-shot plumbing: task names, offline export to jsonl + local YAMLs that include lm-eval's stock ones."""

import json

import pytest

from slr.errors import SLRError
from slr.eval.zeroshot import TASKS, parse_tasks, prepare_tasks


def test_parse_tasks():
    assert parse_tasks("all") == list(TASKS)
    assert parse_tasks("piqa, arc_c,obqa") == ["piqa", "arc_challenge", "openbookqa"]
    with pytest.raises(SLRError, match="unknown zero-shot task 'nope'"):
        parse_tasks("piqa,nope")


def test_prepare_exports_and_includes_stock(tmp_path):
    root = prepare_tasks(["rte", "boolq"], root=tmp_path)
    for name in ("rte", "boolq"):
        rows = (root / name / "validation.jsonl").read_text().splitlines()
        assert len(rows) == TASKS[name].n
        y = (root / name / f"slr_{name}.yaml").read_text()
        assert "include: /" in y and "dataset_path: json" in y and f"task: slr_{name}" in y
    assert set(json.loads(rows[0])) >= {"question", "passage", "label"}  # boolq: bool answer -> int label
    assert json.loads(rows[0])["label"] in (0, 1)
