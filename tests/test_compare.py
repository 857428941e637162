import json

import pytest
from PIL import Image

from panoviz_callback.cli import main
from panoviz_callback.compare import format_markdown, format_table, load_run, setting_differences, write_comparison

_SETTINGS = {"crop_strategy": "e2p", "image_size": 224, "crop_options": {"fov_deg": 90.0, "overlap": 0.5},
             "layer": -1, "keep_cls_token": False, "n_components": 3, "bg_removal": "threshold", "bg_threshold": 0.5,
             "normalize": "auto", "metrics": ["token_cosine"]}


def _report(path, token_cos, overlap=None, settings=None, step=None):
    metrics = {
        "token_cosine": {"per_pair": [token_cos - 0.1, token_cos + 0.1], "mean": token_cos, "std": 0.1},
        "overlap_cosine": {"skipped": "not applicable"} if overlap is None else {"per_pair": [overlap], "mean": overlap, "std": 0.0},
    }
    data = {
        "image": "probe.jpg", "checkpoint": "last.ckpt", "crop_strategy": "e2p", "views": [], "pairs": [[0, 1], [1, 0]],
        "levels": {"vision_encoder": {"token_grid": [14, 14], "metrics": metrics},
                   "resampled": {"token_grid": [14, 14], "metrics": {"linear_cka": {"per_pair": [0.5], "mean": 0.5, "std": 0.0}}}},
    }
    if settings is not None:
        data.update(settings={**_SETTINGS, **settings}, probe="probe.jpg", step=step, epoch=None,
                    panoviz_version="0.1.0")
        data["crop_strategy"] = data["settings"]["crop_strategy"]
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
    assert md.read_text().split("\n\n")[0].count("\n") == 4  # the full table: header, rule, 3 runs
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


def test_settings_differences_are_named(tmp_path):
    same = [load_run(_report(tmp_path / f"s{k}" / "similarity_x.json", 0.5, settings={}), label=f"s{k}")
            for k in (1, 2)]
    assert setting_differences(same) == []
    crop = load_run(_report(tmp_path / "c" / "similarity_x.json", 0.5, settings={"crop_strategy": "anyres_e2p"}),
                    label="anyres")
    size = load_run(_report(tmp_path / "z" / "similarity_x.json", 0.5, settings={"image_size": 112,
                                                                               "bg_removal": "none"}), label="small")
    messages = setting_differences([same[0], crop, size])
    assert messages == ["the runs differ in crop strategy: s1=e2p, anyres=anyres_e2p, small=e2p",
                        "the runs differ in view size (image_size): s1=224, anyres=224, small=112",
                        "the runs differ in bg_removal: s1=threshold, anyres=threshold, small=none"]
    old = load_run(_report(tmp_path / "old" / "similarity_x.json", 0.5), label="old")
    assert setting_differences([same[0], old])[0].startswith("old: the report records no settings")
    assert "**Warning:** these runs were not made the same way" in format_markdown([same[0], crop])


def test_compare_command_warns_naming_the_setting(tmp_path, capsys):
    a = _report(tmp_path / "e2p" / "similarity_last.json", 0.5, 0.7, settings={}, step=96)
    b = _report(tmp_path / "anyres" / "similarity_last.json", 0.6, 0.8, settings={"crop_strategy": "anyres_e2p",
                                                                                  "n_components": 4}, step=96)
    assert main(["compare", str(a.parent), str(b.parent), "--output_dir", str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    assert "panoviz: warning: the runs differ in crop strategy: e2p=e2p, anyres=anyres_e2p" in err
    assert "panoviz: warning: the runs differ in n_components: e2p=3, anyres=4" in err
    assert max(len(line) for line in out.splitlines() if not line.startswith("Wrote ")) <= 100  # paths aside
    assert "vision_encoder" in out and "overlap_cosine" in out
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert "| run | vision_encoder/token_cosine | vision_encoder/overlap_cosine | resampled/linear_cka |" in md
    assert "the runs differ in crop strategy" in md and "| e2p | 96 |" in md


@pytest.mark.parametrize("n_runs", [1, 3, 12])
def test_terminal_table_fits_100_columns(tmp_path, n_runs):
    runs = [load_run(_report(tmp_path / f"similarity_r{k}.json", 0.1 + 0.01 * k, 0.5),
                     label=f"a rather long run label number {k}") for k in range(n_runs)]
    text = format_table(runs)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100
    # transposed: metrics are rows, every run's value appears exactly once per metric
    token_rows = [line for line in lines if line.strip().startswith("token_cosine")]
    values = [v for line in token_rows for v in line.split()[1:]]
    assert values == [f"{0.1 + 0.01 * k:.4f}" for k in range(n_runs)]
    assert sum(line.startswith("resampled") for line in lines) == len(token_rows)
