"""The report: W&B payloads, the JSON file and its self-contained HTML view (no Trainer here)."""

import base64
import json
from html.parser import HTMLParser

import pytest

from splora_callback.dashboard import FIGURES, render_html, short_names, wandb_final_media, write_html_report
from splora_callback.report import (
    DEFAULT_OVER_THRESHOLD,
    REPORT_HTML,
    REPORT_JSON,
    TABLE_COLUMNS,
    build_report,
    kind_means,
    load_report,
    over_threshold,
    summary_scalars,
    wandb_step_payload,
    wandb_summary,
    write_json_report,
)
from splora_callback.scoring import LayerScore, LayerScores

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CONFIG = {
    "metric": "ediem",
    "select": "top_k",
    "k": 2,
    "threshold": None,
    "alert_threshold": None,
    "action": "prune",
}


def layer(
    index: int, kind: str, ediem: float | None, cosine: float = 0.5, status: str = "active"
) -> LayerScore:
    active = status == "active"
    return LayerScore(
        f"model.layers.{index}.self_attn.{kind}",
        kind,
        (64, 64),
        4,
        status,
        1.0 if active else 0.0,
        relative_distance=0.5 if active else None,
        cosine=cosine if active else None,
        ediem=ediem if active else None,
        ediem_scaled=True if active else None,
        signed_alignment=-0.1 * index if active else None,
    )


def scores(shift: float = 0.0) -> LayerScores:
    layers = [
        layer(0, "q_proj", 1.0 + shift, 0.2),
        layer(0, "v_proj", 3.0 + shift, 0.1),
        layer(1, "q_proj", -1.0, 0.4),
        layer(1, "v_proj", None, status="inactive"),
        layer(2, "q_proj", None, status="no_alignment"),
    ]
    return LayerScores("ediem", "layers", {score.name: score for score in layers})


def report(action_layers=("model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.q_proj")) -> dict:
    history = [
        {"step": step, "seconds": 0.01, "selected": list(action_layers), "scores": scores(shift).to_dict()}
        for step, shift in ((5, 0.0), (10, 0.5))
    ]
    action = {
        "action": "prune",
        "layers": list(action_layers),
        "adapter_name": "default",
        "parameters_removed": 1024,
    }
    return json.loads(
        json.dumps(
            build_report(
                CONFIG, history, selected=list(action_layers), action=action, status="finished", step=10
            )
        )
    )


def test_step_payload_has_layer_series_summaries_and_kinds_on_the_trainer_step():
    payload = wandb_step_payload(scores(), step=7, selected=["a"], threshold=2.0, seconds=0.25)
    assert payload["train/global_step"] == 7
    assert {key for key in payload if key.startswith("splora/ediem/")} == {
        "splora/ediem/model.layers.0.self_attn.q_proj",
        "splora/ediem/model.layers.0.self_attn.v_proj",
        "splora/ediem/model.layers.1.self_attn.q_proj",
    }  # inactive / unjudgeable layers have no series
    assert payload["splora/summary/ediem_max"] == 3.0 and payload["splora/summary/ediem_mean"] == 1.0
    assert payload["splora/summary/ediem_over_threshold"] == 1 and payload["splora/summary/cosine_min"] == 0.1
    assert payload["splora/summary/active_layers"] == 3 and payload["splora/summary/inactive_layers"] == 1
    assert (
        payload["splora/summary/selected_layers"] == 1 and payload["splora/summary/scoring_seconds"] == 0.25
    )
    assert payload["splora/kind/q_proj/ediem_mean"] == 0.0 and payload["splora/kind/v_proj/ediem_mean"] == 3.0
    assert payload["splora/kind/q_proj/cosine_mean"] == pytest.approx(0.3)
    assert all(key.startswith("splora/") or key == "train/global_step" for key in payload)


def test_summary_of_a_call_without_active_layers_has_counts_and_no_nan():
    inactive = LayerScores("ediem", "layers", {"x.q_proj": layer(0, "q_proj", None, status="inactive")})
    assert summary_scalars(inactive, [], 2.0) == {
        "active_layers": 0,
        "inactive_layers": 1,
        "selected_layers": 0,
        "ediem_over_threshold": 0,
    }
    assert kind_means(inactive) == {}


def test_over_threshold_prefers_alert_then_selection_threshold_then_tukey_default():
    assert over_threshold({**CONFIG, "alert_threshold": 1.5}) == 1.5
    assert over_threshold({**CONFIG, "select": "threshold", "threshold": 0.7}) == 0.7
    assert (
        over_threshold({**CONFIG, "select": "threshold", "threshold": 0.7, "metric": "cosine"})
        == DEFAULT_OVER_THRESHOLD
    )
    assert over_threshold(CONFIG) == DEFAULT_OVER_THRESHOLD == 2.0


def test_short_names_drop_the_common_dotted_prefix():
    assert short_names(["model.layers.0.q", "model.layers.1.q"]) == ["0.q", "1.q"]
    assert short_names(["a.q", "a.q.x"]) == ["q", "q.x"]
    assert short_names(["only.one"]) == ["only.one"]


def test_json_report_round_trips_and_foreign_json_is_refused(tmp_path):
    data = report()
    path = write_json_report(tmp_path, data)
    assert path == tmp_path / REPORT_JSON and load_report(tmp_path) == data == load_report(path)
    assert [p.name for p in tmp_path.iterdir()] == [REPORT_JSON]  # atomic: no temporary file left behind
    (tmp_path / "other.json").write_text(json.dumps({"history": []}))
    with pytest.raises(ValueError, match="is not a SPLoRA report"):
        load_report(tmp_path / "other.json")


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.figures, self.rows, self.urls = [], [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.urls += [value for key, value in attrs.items() if key in ("src", "href") and value]
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "figure":
            self.figures.append(attrs["id"])
        elif tag == "tr":
            self.rows.append(attrs.get("class", ""))


def test_html_report_embeds_every_figure_and_the_score_table(tmp_path):
    write_json_report(tmp_path, report())
    path = write_html_report(tmp_path)
    assert path == tmp_path / REPORT_HTML
    page = _Page()
    page.feed(path.read_text())
    assert page.figures == list(FIGURES) == ["heatmap", "final_bar", "kinds", "summary"]
    for source in page.images:
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.removeprefix("data:image/png;base64,")).startswith(PNG_SIGNATURE)
    assert all(url.startswith("data:") for url in page.urls)  # readable offline: no external resource
    assert "http://" not in path.read_text() and "https://" not in path.read_text()
    assert page.rows == ["", "pruned", "pruned", "", "", ""]  # header + 5 layers, the 2 pruned marked
    assert sorted(p.name for p in tmp_path.iterdir()) == [REPORT_HTML, REPORT_JSON]


def test_html_of_a_report_without_scores_says_so():
    empty = build_report(CONFIG, [], selected=[], action=None, status="running", step=0)
    html = render_html(empty)
    assert "No scoring call was recorded" in html and "<img" not in html


def test_wandb_final_media_and_summary_mark_the_pruned_layers():
    import wandb

    data = report()
    media = wandb_final_media(wandb, data)
    assert set(media) == {
        "splora/final/scores",
        "splora/final/ediem_by_layer",
        "splora/final/ediem_by_kind",
        "splora/ediem_history",
        "splora/ediem_heatmap",
    }
    table = media["splora/final/scores"]
    assert table.columns == TABLE_COLUMNS and len(table.data) == 5
    assert [row[0] for row in table.data if row[-1]] == data["action"]["layers"][::-1]  # module order
    bars = media["splora/final/ediem_by_layer"].table
    assert [row[0] for row in bars.data if row[0].startswith("[pruned] ")] == [
        "[pruned] model.layers.0.self_attn.q_proj",
        "[pruned] model.layers.0.self_attn.v_proj",
    ]
    assert len(media["splora/ediem_history"].data) == 2 * 3  # two steps x three active layers
    assert isinstance(media["splora/ediem_heatmap"], wandb.Image)
    assert wandb_summary(data) == {
        "splora/pruned_layers": data["action"]["layers"],
        "splora/selected_layers": data["selected"],
        "splora/action": "prune",
        "splora/num_pruned": 2,
        "splora/parameters_removed": 1024,
    }
