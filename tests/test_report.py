import json
import math
import os
import stat

import pytest

from panoviz_callback.report import format_text_report, load_similarity_json, write_reports


class _Result:
    """Stands in for an AnalysisResult: report.py only needs ``to_dict``."""

    def __init__(self, data):
        self.data = data

    def to_dict(self, image=None, checkpoint=None):
        return {**self.data, "image": None if image is None else str(image),
                "checkpoint": None if checkpoint is None else str(checkpoint)}


def _data():
    return {
        "image": None,
        "checkpoint": None,
        "crop_strategy": "anyres_e2p",
        "views": [
            {"yaw_deg": 0.0, "pitch_deg": 0.0, "fov_deg": 360.0, "kind": "global"},
            {"yaw_deg": 0.0, "pitch_deg": 0.0, "fov_deg": 90.0, "kind": "tile"},
            {"yaw_deg": 45.0, "pitch_deg": 0.0, "fov_deg": 90.0, "kind": "tile"},
        ],
        "pairs": [[1, 2], [2, 1]],
        "levels": {
            "vision_encoder": {
                "token_grid": [14, 14],
                "masked_share": [0.0, 0.125, 0.5],
                "bg_note": None,
                "metrics": {
                    "token_cosine": {"per_pair": [0.87321, 0.5], "mean": 0.686605, "std": 0.186605},
                    "overlap_cosine": {"per_pair": [0.9, None], "mean": 0.9, "std": 0.0},
                    "hungarian_accuracy": {"per_pair": [0.75, 0.5], "mean": 0.625, "std": 0.125, "chance": 0.0433,
                                           "ceiling": 1.0},
                    "lpips": {"skipped": "LPIPS backbone weights (alex) are not available offline"},
                },
            },
            "resampled": {
                "token_grid": None,
                "masked_share": [0.0, 0.0, 0.0],
                "bg_note": "bg_removal='threshold': the first component is not bimodal; kept every token.",
                "metrics": {"overlap_cosine": {"skipped": "not applicable: query tokens have no spatial position"}},
            },
        },
    }


def test_smoke_text_layout():
    text = format_text_report(_data())
    assert "View 1 <-> View 2: 0.8732" in text
    assert "View 2 <-> View 1: 0.5000" in text
    assert "mean: 0.6866 +- 0.1866" in text
    assert "View 2 <-> View 1: n/a" in text  # undefined pair of a partly-overlapping metric
    assert "skipped: LPIPS backbone weights (alex) are not available offline" in text
    assert "skipped: not applicable: query tokens have no spatial position" in text
    assert "vision_encoder (token grid 14x14)" in text
    assert "resampled (query tokens, no spatial layout)" in text
    assert "View 0: global view" in text and "View 2: yaw 45° pitch 0° fov 90° (tile)" in text
    assert "reference (mean over pairs): chance 0.0433, ceiling 1.0000" in text
    assert "PCA tokens left out (background/outliers) per view: 0: 0.0% 1: 12.5% 2: 50.0%" in text
    assert "PCA note: bg_removal='threshold': the first component is not bimodal; kept every token." in text
    # a block per level, a block per metric, in the given order
    assert text.index("vision_encoder (") < text.index("token_cosine") < text.index("overlap_cosine") < text.index(
        "resampled (")
    assert text.endswith("\n")


def test_write_reports_roundtrip(tmp_path):
    paths = write_reports(_Result(_data()), tmp_path / "out", "run1", image="pano.jpg", checkpoint="last.ckpt")
    assert paths["txt"].name == "similarity_analysis_run1.txt"
    assert paths["json"].name == "similarity_run1.json"
    data = load_similarity_json(paths["json"])
    assert data["image"] == "pano.jpg" and data["checkpoint"] == "last.ckpt"
    assert data["levels"]["vision_encoder"]["metrics"]["overlap_cosine"]["per_pair"] == [0.9, None]
    assert paths["txt"].read_text(encoding="utf-8") == format_text_report(data)
    assert sorted(p.name for p in paths["txt"].parent.iterdir()) == ["similarity_analysis_run1.txt",
                                                                      "similarity_run1.json"]
    mask = os.umask(0)
    os.umask(mask)
    for path in paths.values():  # the permissions of a normally created file, not mkstemp's 0600
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_exception_nan_is_never_written(tmp_path):
    data = _data()
    data["levels"]["vision_encoder"]["metrics"]["token_cosine"]["mean"] = math.nan
    with pytest.raises(ValueError, match="Out of range float values"):
        write_reports(_Result(data), tmp_path, "bad")
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no temporary file left


@pytest.mark.parametrize("name", ["", "a/b"])
def test_exception_bad_name(tmp_path, name):
    with pytest.raises(ValueError, match="Argument `name` must be a non-empty file name"):
        write_reports(_Result(_data()), tmp_path, name)


def test_exception_load(tmp_path):
    bad = tmp_path / "similarity_x.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        load_similarity_json(bad)
    bad.write_text(json.dumps({"pairs": []}))
    with pytest.raises(ValueError, match="no 'levels' entry"):
        load_similarity_json(bad)
    with pytest.raises(ValueError, match="cannot be read"):
        load_similarity_json(tmp_path / "missing.json")
