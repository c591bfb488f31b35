"""The HTML report: headline numbers first, figures embedded, and no crash when a run left only some of its files."""

import base64
import dataclasses
import json
import re

import numpy as np
import torch

import vislang
from vislang.evaluation.report import evaluate_run, flatten_numbers, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(run, n_steps=30):
    lines = [
        {
            "step": s,
            "epoch": s / 10,
            "loss": 2.5 - s / 20,
            "lr": 1e-3 * min(1, s / 5),
            "samples_per_s": 400.0 + s,
            "logit_scale": 14.0 + s / 10,
        }
        for s in range(1, n_steps + 1)
    ]
    lines.insert(10, {"step": 10, "eval/zero_shot_top1": 0.41})
    lines.append({"step": n_steps, "eval/zero_shot_top1": 0.7321})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_full_report_has_headline_figures_tables_and_config(tmp_path):
    from vislang.evaluation.plots import plot_confusion

    run = tmp_path / "demo"
    (run / "eval").mkdir(parents=True)
    write_metrics(run)
    results = {
        "headline": {
            "zero_shot_top1": 0.8123,
            "zero_shot_top5": 0.991,
            "zero_shot_chance": 0.1,
            "text_to_image_R@1": 0.4567,
            "text_to_image_chance_R@1": 0.0123,
            "linear_probe_accuracy": 0.877,
        },
        "zero_shot": {
            "top1": 0.8123,
            "top5": 0.991,
            "chance": 0.1,
            "per_class": {
                "sneaker": {"precision": 0.9, "recall": 0.8, "f1": 0.847, "support": 1000},
                "ankle <boot>": {"precision": 0.7, "recall": 0.6, "f1": 0.646, "support": 1000},
            },
            "confusion": [[800, 200], [400, 600]],
        },
        "retrieval": {
            "text_to_image_R@1": 0.4567,
            "text_to_image_chance_R@1": 0.0123,
            "image_to_text_R@1": 0.3,
            "image_to_text_chance_R@1": 0.01,
            "unique_captions": 100,
            "images_per_caption": 100.0,
        },
        "linear_probe": {"accuracy": 0.877, "C": 0.1, "n_train": 20000, "n_test": 10000, "converged": True},
        "custom": {"nested": {"bleu": 0.25}},
    }
    (run / "eval" / "results.json").write_text(json.dumps(results))
    plot_confusion(np.array([[8, 2], [4, 6]]), ["sneaker", "ankle boot"], run / "eval" / "confusion.png")
    plot_confusion(np.eye(2), ["a", "b"], run / "eval" / "extra_figure.png")
    (run / "config.yaml").write_text("model_name: fmnist-cnn\nepochs: 8\n")

    path = write_report(run)
    assert path == run / "report.html"
    page = path.read_text()
    assert page.index("81.2%") < page.index("Training curves")  # headline before everything else
    assert "zero-shot top-1" in page and "45.7%" in page and "87.7%" in page and "chance 10.0%" in page
    assert "ankle &lt;boot&gt;" in page and "<boot>" not in page  # escaped
    assert "custom.nested.bleu" in page  # unknown numeric results still appear in the all-numbers table
    assert "model_name: fmnist-cnn" in page
    assert "Captions repeat" in page
    pngs = embedded_pngs(page)
    assert len(pngs) == 3  # curves, confusion, the extra figure
    assert all(p[:8] == PNG_MAGIC for p in pngs)
    assert 'src="eval/' not in page  # nothing referenced by path: the file can be mailed


def test_report_survives_an_empty_run_dir(tmp_path):
    page = write_report(tmp_path).read_text()
    assert page.count("not evaluated") >= 3
    assert "no metrics.jsonl" in page and "no config file" in page


def test_report_from_training_log_only_and_broken_files(tmp_path):
    write_metrics(tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 31, "loss": 1.')  # killed mid-write
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text("{not json")
    page = write_report(tmp_path).read_text()
    assert "73.2%" in page and "last periodic eval" in page  # periodic eval stands in for missing test results
    assert "could not read results.json" in page
    assert "final loss" in page and len(embedded_pngs(page)) == 1


def test_flatten_numbers_skips_lists_and_bools():
    assert flatten_numbers({"a": {"b": 1, "c": [1, 2], "d": True}, "e": 0.5, "f": "x"}) == [("a.b", 1), ("e", 0.5)]


class TinyPrepared:
    def __init__(self, images, labels, classnames, captions):
        self.images, self.labels, self.classnames, self.captions = images, np.asarray(labels), classnames, captions

    def __len__(self):
        return len(self.images)

    def get_batch(self, indices):
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return {"image": self.images[idx], "label": torch.as_tensor(self.labels)[idx], "index": idx}


def test_evaluate_run_then_report(tmp_path, tiny_model_cfg):
    from vislang.factory import fit_config_to_tokenizer
    from vislang.tokenizers import Tokenizer

    classnames = ["red star", "blue ring"]
    labels = np.arange(40) % 2
    captions = [f"a {classnames[y]} at {i}" for i, y in enumerate(labels)]  # every image its own caption
    tokenizer = Tokenizer.train(captions, vocab_size=200, context_length=24)
    cfg = dataclasses.replace(tiny_model_cfg, text=dataclasses.replace(tiny_model_cfg.text, context_length=24))
    model = vislang.create_model(fit_config_to_tokenizer(cfg, tokenizer))
    v = model.cfg.vision
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, v.channels, v.image_size, v.image_size), dtype=torch.uint8, generator=g)
    ds = TinyPrepared(images, labels, classnames, captions)
    results = evaluate_run(
        model,
        tokenizer,
        ds,
        tmp_path / "eval",
        train_dataset=ds,
        probe_max_train=None,
        gallery_queries=["a red star", "something else"],
    )
    assert results["retrieval"]["images_per_caption"] == 1.0 and results["retrieval"]["n_texts"] == 40
    assert "precision_at_k" not in results["gallery"]  # "something else" names no class: no right/wrong frames
    page = write_report(tmp_path).read_text()
    top1 = results["headline"]["zero_shot_top1"]
    assert f"{100 * top1:.1f}%" in page
    assert len(embedded_pngs(page)) == 3  # confusion, per-class, gallery (no training log here)
    assert "not evaluated" not in page.split("Linear probe")[1].split("</table>")[0]


def test_caption_report_shows_metrics_per_method_and_a_sample_grid(tmp_path):
    from PIL import Image

    run = tmp_path / "cap"
    (run / "eval" / "caption_samples").mkdir(parents=True)
    samples = []
    for i in range(14):
        name = f"caption_samples/test_{i:02d}.png"
        Image.new("RGB", (24, 24), (10 * i, 0, 0)).save(run / "eval" / name)
        samples.append({"subset": "test", "image": name, "references": ["a <red> circle", "a red circle", "one"],
                        "captions": {"greedy": f"caption {i}", "beam3": "a red circle"}})  # fmt: skip
    methods = {"greedy": {"BLEU-4": 0.41, "CIDEr": 1.2}, "beam3": {"BLEU-4": 0.52, "CIDEr": 1.63},
               "nn_baseline": {"BLEU-4": 0.31, "CIDEr": 0.94}}  # fmt: skip
    captions = {
        "subsets": {"test": {"about": "held-out images", "images": 100, "methods": methods},
                    "holdout": {"about": "held-out colour-shape combinations", "images": 50, "methods": methods}},
        "notes": ["METEOR omitted: no `java` on PATH"],
        "samples": samples,
    }  # fmt: skip
    (run / "eval" / "captions.json").write_text(json.dumps(captions))
    page = write_report(run).read_text()
    head = page.split("<h2>Training curves</h2>")[0]
    assert "caption CIDEr" in head and "1.63" in head and "beam3, test; nearest-neighbour 0.94" in head
    section = page.split("<h2>Captioning</h2>")[1].split("<h2>")[0]
    assert section.count("<tr>") == 1 + 6 and "nn_baseline" in section and "METEOR omitted" in section
    assert section.count('class="sample"') == 12  # a grid of twelve, not every sample
    assert "caption 11" in section and "caption 12" not in section
    assert "a &lt;red&gt; circle" in section and "<red>" not in section and "(+1 more)" in section
    assert len(embedded_pngs(page)) == 12 and all(p[:8] == PNG_MAGIC for p in embedded_pngs(page))


def test_caption_run_without_caption_eval_says_how_and_shows_cider_as_a_number(tmp_path):
    lines = [
        {"step": 5, "loss": 3.0, "caption_loss": 1.0, "lr": 1e-3},
        {"step": 5, "eval/CIDEr": 1.7, "eval/BLEU-4": 0.4},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    page = write_report(tmp_path).read_text()
    assert "170.0%" not in page and ">1.7<" in page and "40.0%" in page  # CIDEr runs 0..10: not a percentage
    assert "vislang caption-eval --model" in page.split("<h2>Captioning</h2>")[1]


def test_dual_encoder_report_has_no_captioning_section(tmp_path):
    write_metrics(tmp_path)
    assert "<h2>Captioning</h2>" not in write_report(tmp_path).read_text()
