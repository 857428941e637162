import json

import pytest
from PIL import Image

from panoviz_callback.compare import format_markdown, load_run, write_comparison


def _report(path, token_cos, overlap=None):
    metrics = {
        "token_cosine": {"per_pair": [token_cos - 0.1, token_cos + 0.1], "mean": token_cos, "std": 0.1},
        "overlap_cosine": {"skipped": "not applicable"} if overlap is None else {"per_pair": [overlap], "mean": overlap, "std": 0.0},
    }
    data = {
        "image": "probe.jpg", "checkpoint": "last.ckpt", "crop_strategy": "e2p", "views": [], "pairs": [[0, 1], [1, 0]],
        "levels": {"vision_encoder": {"token_grid": [14, 14], "metrics": metrics},
                   "resampled": {"token_grid": [14, 14], "metrics": {"linear_cka": {"per_pair": [0.5], "mean": 0.5, "std": 0.0}}}},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_load_run_file_and_folder_average(tmp_path):
    single = load_run(_report(tmp_path / "a" / "similarity_a.json", 0.4, 0.8))
    assert single.label == "a"
    assert single.means[("vision_encoder", "token_cosine")] == pytest.approx(0.4)
    # a folder with two images' reports averages their means; skipped metrics are left out
    _report(tmp_path / "run" / "img1" / "similarity_run.json", 0.2, 0.6)
    _report(tmp_path / "run" / "img2" / "similarity_run.json", 0.6)
    run = load_run(tmp_path / "run", label="stage 2")
    assert run.label == "stage 2" and len(run.sources) == 2
    assert run.means[("vision_encoder", "token_cosine")] == pytest.approx(0.4)
    assert run.means[("vision_encoder", "overlap_cosine")] == pytest.approx(0.6)


def test_markdown_table_rows_and_columns(tmp_path):
    a = load_run(_report(tmp_path / "similarity_before.json", 0.25, 0.5), label="before")
    b = load_run(_report(tmp_path / "similarity_after.json", 0.5), label="after")
    table = format_markdown([a, b]).splitlines()
    assert table[0] == "| run | vision_encoder/token_cosine | vision_encoder/overlap_cosine | resampled/linear_cka |"
    assert table[2] == "| before | 0.2500 | 0.5000 | 0.5000 |"
    assert table[3] == "| after | 0.5000 | - | 0.5000 |"


def test_write_comparison_files(tmp_path):
    runs = [load_run(_report(tmp_path / f"similarity_{k}.json", 0.1 * k, 0.2 * k)) for k in (1, 2, 3)]
    md, png = write_comparison(runs, tmp_path / "out")
    assert md.read_text().count("\n") == 5
    with Image.open(png) as im:
        assert im.width <= 2400 and im.height > 100
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["comparison.md", "comparison.png"]


@pytest.mark.parametrize(
    ("content", "match"),
    [(None, "no such file"), ("{not json", "invalid JSON"), ('{"a": 1}', "no 'levels'"), ("dir", "no similarity_")],
)
def test_load_run_errors(tmp_path, content, match):
    path = tmp_path / "similarity_x.json"
    if content == "dir":
        path = tmp_path / "empty"
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_run(path)
