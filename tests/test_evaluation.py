"""Evaluation: embedding, zero-shot, retrieval, linear probe and plots, against hand-computed answers and references.

Most tests use an "oracle" model whose embeddings are fixed tables, so every expected number is known in advance;
a tiny real ``CLIP`` checks that the batching and one-pass helpers agree with ``encode_image`` itself.
"""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vislang
from vislang.evaluation import (
    chance_hit_rate,
    chance_recall,
    classification_metrics,
    dedupe_captions,
    embed_images,
    embed_images_and_features,
    embed_texts,
    linear_probe,
    probe_eval,
    retrieval_eval,
    retrieval_metrics,
    tower_features,
    zero_shot_classifier,
    zero_shot_eval,
    zero_shot_predict,
)
from vislang.evaluation.plots import plot_confusion, plot_curves, plot_per_class, retrieval_gallery
from vislang.evaluation.report import class_of_query, evaluate_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- fakes --------------------------------------------------------------------------------------------------------
def index_images(n: int) -> torch.Tensor:
    """uint8 (n, 1, 2, 2) images whose first two pixels spell their own index (base 256)."""
    x = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
    idx = torch.arange(n)
    x[:, 0, 0, 0] = idx // 256
    x[:, 0, 0, 1] = idx % 256
    return x


class OracleModel(nn.Module):
    """encode_image reads the image index from its pixels and returns row ``index`` of a fixed table; encode_text
    returns the table row of the token id. std = 1/255 makes normalisation the identity on pixel values."""

    def __init__(self, image_table: torch.Tensor, text_table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("image_table", image_table.float())
        self.register_buffer("text_table", text_table.float())
        self.cfg = SimpleNamespace(vision=SimpleNamespace(mean=(0.0,), std=(1 / 255,)))

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        idx = images[:, 0, 0, 0].round().long() * 256 + images[:, 0, 0, 1].round().long()
        x = self.image_table[idx]
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.text_table[ids[:, 0]]
        return F.normalize(x, dim=-1) if normalize else x

    def get_logit_scale(self) -> torch.Tensor:
        return torch.tensor(10.0)


class VocabTokenizer:
    """Maps each known text to one token: its position in ``vocab``."""

    def __init__(self, vocab: list[str]) -> None:
        self.ids = {t: i for i, t in enumerate(vocab)}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([[self.ids[t]] for t in texts], dtype=torch.long)


class FakePrepared:
    """The prepared-dataset interface: ``get_batch``, ``labels``, ``classnames``, ``captions``."""

    def __init__(self, images: torch.Tensor, labels=None, classnames=None, captions=None) -> None:
        self.images = images
        n = len(images)
        self.labels = np.full(n, -1, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
        self.classnames = classnames
        self.captions = captions

    def __len__(self) -> int:
        return len(self.images)

    def get_batch(self, indices) -> dict:
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return {"image": self.images[idx], "label": torch.as_tensor(self.labels)[idx], "index": idx}


def oracle_zero_shot_setup(templates: list[str]):
    """6 classes with one-hot text embeddings (same for every template) and 8 images with hand-set class scores."""
    classnames = ["cat", "dog", "pig", "fox", "yak", "bee"]
    vocab = [t.format(c) for c in classnames for t in templates]
    text_table = torch.stack([F.one_hot(torch.tensor(i // len(templates)), 6).float() for i in range(len(vocab))])
    scores = torch.tensor(
        [
            [9, 1, 1, 1, 1, 1],  # label 0, predicted 0
            [1, 9, 1, 1, 1, 1],  # label 1, predicted 1
            [1, 1, 9, 1, 1, 1],  # label 2, predicted 2
            [1, 1, 1, 9, 1, 1],  # label 3, predicted 3
            [1, 1, 1, 1, 9, 1],  # label 4, predicted 4
            [9, 1, 1, 1, 1, 2],  # label 5, predicted 0; class 5 ranked 2nd -> top-5 hit
            [0, 9, 8, 7, 6, 5],  # label 0, predicted 1; class 0 ranked last -> top-5 miss
            [1, 8, 9, 1, 1, 1],  # label 1, predicted 2; class 1 ranked 2nd -> top-5 hit
        ],
        dtype=torch.float32,
    )
    labels = np.array([0, 1, 2, 3, 4, 5, 0, 1])
    model = OracleModel(scores, text_table)
    dataset = FakePrepared(index_images(8), labels, classnames)
    return model, VocabTokenizer(vocab), dataset, classnames


@pytest.fixture
def tiny_clip(tiny_model_cfg):
    torch.manual_seed(0)
    return vislang.create_model(tiny_model_cfg).eval()


# --- embedding ----------------------------------------------------------------------------------------------------
def test_embed_images_matches_encode_image_and_restores_train_mode(tiny_clip):
    from vislang.data.transforms import normalize

    v = tiny_clip.cfg.vision
    images = torch.randint(0, 256, (7, v.channels, v.image_size, v.image_size), dtype=torch.uint8)
    with torch.no_grad():
        expected = tiny_clip.encode_image(normalize(images, v.mean, v.std))
    tiny_clip.train()
    got = embed_images(tiny_clip, FakePrepared(images), batch_size=3)
    assert tiny_clip.training, "embedding must put the model back in train mode"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(embed_images(tiny_clip, images, batch_size=4), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(7))
    subset = embed_images(tiny_clip, images, indices=[5, 1])
    torch.testing.assert_close(subset, expected[[5, 1]], atol=1e-5, rtol=1e-4)


def test_one_pass_features_equal_separate_passes(tiny_clip):
    v = tiny_clip.cfg.vision
    images = torch.randint(0, 256, (6, v.channels, v.image_size, v.image_size), dtype=torch.uint8)
    emb, feats = embed_images_and_features(tiny_clip, images, batch_size=4)
    torch.testing.assert_close(emb, embed_images(tiny_clip, images))
    torch.testing.assert_close(feats, tower_features(tiny_clip, images))
    assert feats.shape == (6, tiny_clip.visual.width)


def test_embed_texts_batches_in_order():
    table = torch.randn(5, 4)
    model = OracleModel(torch.zeros(1, 4), table)
    vocab = ["a", "b", "c", "d", "e"]
    got = embed_texts(model, VocabTokenizer(vocab), ["e", "a", "c"], batch_size=2)
    torch.testing.assert_close(got, F.normalize(table[[4, 0, 2]], dim=-1))


# --- zero-shot ----------------------------------------------------------------------------------------------------
def test_zero_shot_classifier_is_the_renormalised_template_mean():
    templates = ["a {}.", "the {}!", "one {}?"]
    classnames = ["x", "y"]
    vocab = [t.format(c) for c in classnames for t in templates]
    g = torch.Generator().manual_seed(0)
    table = torch.randn(len(vocab), 8, generator=g) * torch.rand(len(vocab), 1, generator=g) * 5  # varied norms
    model = OracleModel(torch.zeros(1, 8), table)
    got = zero_shot_classifier(model, VocabTokenizer(vocab), classnames, templates)
    assert got.shape == (8, 2)
    for k, c in enumerate(classnames):
        rows = torch.stack([F.normalize(table[vocab.index(t.format(c))], dim=0) for t in templates])
        expected = F.normalize(rows.mean(0), dim=0)
        torch.testing.assert_close(got[:, k], expected)


def test_zero_shot_eval_known_answer():
    templates = ["a photo of a {}.", "a {}."]
    model, tokenizer, dataset, classnames = oracle_zero_shot_setup(templates)
    out = zero_shot_eval(model, tokenizer, dataset, templates=templates, batch_size=3)
    assert out["top1"] == pytest.approx(5 / 8)
    assert out["top5"] == pytest.approx(7 / 8)
    np.testing.assert_array_equal(out["predictions"], [0, 1, 2, 3, 4, 0, 1, 2])
    expected_cm = np.zeros((6, 6), dtype=int)
    for t, p in zip(dataset.labels, [0, 1, 2, 3, 4, 0, 1, 2]):
        expected_cm[t, p] += 1
    np.testing.assert_array_equal(out["confusion"], expected_cm)
    np.testing.assert_allclose(out["recall"], [0.5, 0.5, 1, 1, 1, 0])
    np.testing.assert_allclose(out["precision"], [0.5, 0.5, 0.5, 1, 1, 0])  # class 1 predicted for images 1 and 6
    np.testing.assert_array_equal(out["support"], [2, 2, 1, 1, 1, 1])
    assert out["classnames"] == classnames


def test_zero_shot_eval_skips_unknown_labels_and_rejects_unlabelled():
    model, tokenizer, dataset, _ = oracle_zero_shot_setup(["a {}."])
    dataset.labels[6] = -1  # the one top-5 miss is now unlabelled
    out = zero_shot_eval(model, tokenizer, dataset, templates=["a {}."])
    assert out["n"] == 7
    assert out["top5"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="rows but there are 8 labels"):
        zero_shot_eval(model, tokenizer, dataset, templates=["a {}."], image_emb=torch.zeros(3, 6))
    dataset.labels[:] = -1
    with pytest.raises(ValueError, match="no labelled items"):
        zero_shot_eval(model, tokenizer, dataset, templates=["a {}."])


def test_classification_metrics_match_torchmetrics_and_sklearn():
    from sklearn.metrics import f1_score, top_k_accuracy_score
    from torchmetrics.classification import MulticlassAccuracy

    g = torch.Generator().manual_seed(1)
    scores, labels = torch.randn(200, 7, generator=g), torch.randint(0, 7, (200,), generator=g)
    out = classification_metrics(scores, labels, 7)
    for k in (1, 5):
        ref = MulticlassAccuracy(num_classes=7, top_k=k, average="micro")(scores, labels)
        assert out[f"top{k}"] == pytest.approx(float(ref))
        assert out[f"top{k}"] == pytest.approx(top_k_accuracy_score(labels, scores, k=k, labels=range(7)))
    assert out["macro_f1"] == pytest.approx(f1_score(labels, scores.argmax(1), average="macro"))
    assert out["confusion"].sum() == 200 and out["confusion"].trace() == round(out["top1"] * 200)


def test_zero_shot_predict_probabilities():
    model, tokenizer, dataset, classnames = oracle_zero_shot_setup(["a {}."])
    images = dataset.images.float() * 1.0  # float input is taken as model-ready
    probs = zero_shot_predict(model, tokenizer, images[5], classnames, templates=["a {}."])
    assert probs.shape == (1, 6)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1))
    assert int(probs.argmax()) == 0 and int(probs[0].argsort()[-2]) == 5
    emb = F.normalize(model.image_table[5], dim=0)
    torch.testing.assert_close(probs[0], (10.0 * emb).softmax(-1))  # one-hot classes: logits = scale * embedding


# --- retrieval ----------------------------------------------------------------------------------------------------
def naive_hit_rates(image_emb, text_emb, text_to_image, k):
    """Per-query loops: the obvious definition, for parity."""
    sims = (image_emb @ text_emb.T).numpy()
    t2i = [text_to_image[t] in np.argsort(-sims[:, t])[:k] for t in range(sims.shape[1])]
    i2t = []
    for i in range(sims.shape[0]):
        mine = [t for t, im in enumerate(text_to_image) if im == i]
        if mine:
            i2t.append(bool(set(np.argsort(-sims[i])[:k]) & set(mine)))
    return float(np.mean(i2t)), float(np.mean(t2i))


def test_retrieval_metrics_match_naive_loop_and_torchmetrics():
    from torchmetrics.retrieval import RetrievalHitRate

    g = torch.Generator().manual_seed(0)
    n_img, n_txt = 20, 45
    image_emb = F.normalize(torch.randn(n_img, 8, generator=g), dim=-1)
    text_to_image = torch.randint(0, n_img - 3, (n_txt,), generator=g).tolist()  # several captions; 3+ images none
    text_emb = F.normalize(image_emb[text_to_image] + 0.9 * torch.randn(n_txt, 8, generator=g), dim=-1)
    out = retrieval_metrics(image_emb, text_emb, text_to_image, ks=(1, 5, 10))
    assert out["n_texts"] == n_txt and out["n_images"] == len(set(text_to_image))
    sims = image_emb @ text_emb.T  # (I, T)
    relevant = torch.zeros(n_img, n_txt, dtype=torch.bool)
    relevant[text_to_image, torch.arange(n_txt)] = True
    for k in (1, 5, 10):
        i2t, t2i = naive_hit_rates(image_emb, text_emb, text_to_image, k)
        assert out[f"image_to_text_R@{k}"] == pytest.approx(i2t)
        assert out[f"text_to_image_R@{k}"] == pytest.approx(t2i)
        tm = RetrievalHitRate(top_k=k, empty_target_action="skip")
        rows = torch.arange(n_img).unsqueeze(1).expand(n_img, n_txt)
        ref_i2t = tm(sims.flatten(), relevant.flatten(), indexes=rows.flatten())
        assert out[f"image_to_text_R@{k}"] == pytest.approx(float(ref_i2t))
        tm = RetrievalHitRate(top_k=k, empty_target_action="skip")
        cols = torch.arange(n_txt).unsqueeze(1).expand(n_txt, n_img)
        ref_t2i = tm(sims.T.flatten(), relevant.T.flatten(), indexes=cols.flatten())
        assert out[f"text_to_image_R@{k}"] == pytest.approx(float(ref_t2i))
    assert out["text_to_image_R@1"] < out["text_to_image_R@5"] <= out["text_to_image_R@10"]


def test_retrieval_perfect_embeddings_and_k_larger_than_candidates():
    emb = torch.eye(4)
    out = retrieval_metrics(emb, emb.clone(), [0, 1, 2, 3], ks=(1, 50))
    assert out["image_to_text_R@1"] == 1.0 and out["text_to_image_R@1"] == 1.0
    assert out["text_to_image_R@50"] == 1.0 and out["text_to_image_chance_R@50"] == 1.0
    assert out["text_to_image_chance_R@1"] == pytest.approx(chance_recall(4, 1)) == 0.25


def test_chance_levels():
    assert chance_recall(1000, 5) == pytest.approx(0.005)
    for n, r, k in [(100, 1, 5), (100, 7, 10), (30, 10, 25), (10, 3, 10)]:
        assert chance_hit_rate(n, r, k) == pytest.approx(1 - math.comb(n - r, k) / math.comb(n, k))
    assert chance_hit_rate(100, [1, 7], 10) == pytest.approx(
        (chance_hit_rate(100, 1, 10) + chance_hit_rate(100, 7, 10)) / 2
    )


def test_dedupe_captions_keeps_first_seen_order():
    texts, groups = dedupe_captions(["b", "a", "b", "c", "a", "b"])
    assert texts == ["b", "a", "c"]
    assert [g.tolist() for g in groups] == [[0, 2, 5], [1, 4], [3]]


def test_retrieval_eval_merges_repeated_captions():
    # 6 images, captions repeat: an exact-caption text query is found when any image carrying it is retrieved.
    captions = ["red", "blue", "red", "green", "blue", "red"]
    vocab = ["red", "blue", "green"]
    text_table = torch.eye(3)
    image_table = torch.tensor(
        [[1, 0, 0], [0, 1, 0], [0.9, 0.1, 0], [0, 0, 1], [0.6, 0.4, 0], [0, 0.2, 0.8]], dtype=torch.float32
    )
    model = OracleModel(image_table, text_table)
    ds = FakePrepared(index_images(6), captions=captions)
    out = retrieval_eval(model, VocabTokenizer(vocab), ds, ks=(1, 2))
    assert out["unique_captions"] == 3 and out["images_per_caption"] == 2
    # text→image: red -> image 0 (red) hit; blue -> image 1 hit; green -> image 3 hit.
    assert out["text_to_image_R@1"] == 1.0
    # image→text top-1: 0 red✓, 1 blue✓, 2 red✓, 3 green✓, 4 red✗ (is blue), 5 green✗ (is red) -> 4/6.
    assert out["image_to_text_R@1"] == pytest.approx(4 / 6)
    # top-2: 4 ranks red, blue ✓; 5 ranks green, blue ✗ -> 5/6.
    assert out["image_to_text_R@2"] == pytest.approx(5 / 6)


def test_retrieval_eval_needs_captions():
    model = OracleModel(torch.eye(2), torch.eye(2))
    with pytest.raises(ValueError, match="captions"):
        retrieval_eval(model, VocabTokenizer(["a"]), FakePrepared(index_images(2)))


# --- linear probe -------------------------------------------------------------------------------------------------
def blobs(n: int, d: int = 32, k: int = 4, spread: float = 0.5, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 3
    y = rng.integers(0, k, n)
    return (centers[y] + spread * rng.normal(size=(n, d))).astype(np.float32), y


def test_linear_probe_separable_data():
    x, y = blobs(1200)
    out = linear_probe(x[:1000], y[:1000], x[1000:], y[1000:])
    assert out["accuracy"] > 0.97
    assert out["C"] in (0.01, 0.1, 1.0, 10.0) and set(out["val_accuracy"]) == {"0.01", "0.1", "1.0", "10.0"}
    assert out["n_train"] == 1000 and out["n_test"] == 200


def test_linear_probe_fixed_C_drops_unknown_labels_and_is_near_chance_on_noise():
    x, y = blobs(600, spread=0.5)
    y_unknown = y.copy()
    y_unknown[:100] = -1
    out = linear_probe(torch.from_numpy(x[:500]), torch.from_numpy(y_unknown[:500]), x[500:], y[500:], C=1.0)
    assert out["C"] == 1.0 and out["n_train"] == 400 and "val_accuracy" not in out
    rng = np.random.default_rng(3)
    noise = rng.normal(size=(600, 32)).astype(np.float32)
    out = linear_probe(noise[:500], y[:500], noise[500:], y[500:], C=0.01)
    assert out["accuracy"] < 0.5  # 4 classes: chance is 0.25; no signal must not look like signal


def test_probe_eval_on_tower_features(tiny_clip):
    v = tiny_clip.cfg.vision
    g = torch.Generator().manual_seed(0)
    n = 120
    labels = np.arange(n) % 2
    base = torch.randint(0, 60, (n, v.channels, v.image_size, v.image_size), generator=g)
    base[labels == 1] += 150  # bright vs dark images: linearly separable even through random features
    ds = FakePrepared(base.to(torch.uint8), labels)
    out = probe_eval(tiny_clip, ds, ds, max_train=80, C=1.0)
    assert out["n_train"] == 80 and out["n_test"] == n
    assert out["accuracy"] > 0.9


# --- plots --------------------------------------------------------------------------------------------------------
def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000


def test_plots_write_pngs(tmp_path):
    import json

    from PIL import Image

    cm = np.array([[5, 1, 0], [2, 3, 1], [0, 0, 6]])
    assert_png(plot_confusion(cm, ["a", "b", "c"], tmp_path / "cm.png"))
    assert_png(plot_per_class([0.5, 0.8, 1.0], tmp_path / "pc.png", ["a", "b", "c"]))
    assert_png(plot_per_class({"recall": [0.5, 0.8, 1.0], "f1": [0.4, 0.7, 0.9]}, tmp_path / "pc2.png"))
    log = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "epoch": s / 10, "loss": 3 / (s + 1), "lr": 1e-3, "samples_per_s": 100.0} for s in range(20)]
    lines.append({"step": 19, "eval/zero_shot_top1": 0.6})
    log.write_text("\n".join(json.dumps(r) for r in lines) + '\n{"step": 20, "lo')  # a half-written last line
    assert_png(plot_curves(log, tmp_path / "curves.png"))
    (tmp_path / "empty.jsonl").write_text("")
    assert plot_curves(tmp_path / "empty.jsonl", tmp_path / "none.png") is None
    # A GAN run logs no "loss" or "lr": its two losses and D's scores get a panel each (tracked-FID lines mixed in).
    gan = [{"step": s, "loss_d": 1.5, "loss_g": 0.2 * s, "d_real": 0.9, "d_fake": -0.5} for s in range(1, 9)]
    gan.append({"step": 8, "tracked_fid_fm": 0.3})
    (tmp_path / "gan.jsonl").write_text("\n".join(json.dumps(r) for r in gan))
    (tmp_path / "one.jsonl").write_text("\n".join(json.dumps({"step": s, "loss": 1.0}) for s in range(5)))
    widths = [
        Image.open(plot_curves(tmp_path / f"{name}.jsonl", tmp_path / f"{name}.png")).size[0] for name in ("gan", "one")
    ]
    assert widths[0] > 1.8 * widths[1]  # two panels against one
    top = torch.randint(0, 256, (2, 3, 3, 8, 8), dtype=torch.uint8)
    flags = np.array([[True, False, True], [False, False, True]])
    assert_png(retrieval_gallery(["a red star", "a blue ring"], top, torch.rand(2, 3), tmp_path / "g.png", flags))
    gray = torch.randint(0, 256, (1, 2, 1, 8, 8), dtype=torch.uint8)
    assert_png(retrieval_gallery(["q"], gray, np.ones((1, 2)), tmp_path / "g1.png"))


# --- evaluate_run -------------------------------------------------------------------------------------------------
def test_class_of_query_prefers_the_longest_name():
    names = ["t-shirt", "shirt", "bag", "ankle boot"]
    assert class_of_query("a photo of a t-shirt.", names) == 0
    assert class_of_query("a photo of a shirt.", names) == 1
    assert class_of_query("an ankle boot", names) == 3
    assert class_of_query("a handbag", names) is None


def test_evaluate_run_with_an_oracle_model(tmp_path):
    import json

    templates = ["a photo of a {}.", "a {}."]
    model, _, dataset, classnames = oracle_zero_shot_setup(templates)
    captions = [f"a photo of a {classnames[y]}." for y in dataset.labels]  # repeated captions: 6 distinct
    vocab = [t.format(c) for c in classnames for t in templates]
    dataset.captions = captions
    out = evaluate_run(model, VocabTokenizer(vocab), dataset, tmp_path / "eval", templates=templates, gallery_k=3)
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["headline"]["zero_shot_top1"] == pytest.approx(5 / 8) == out["zero_shot"]["top1"]
    assert saved["zero_shot"]["per_class"]["bee"]["recall"] == 0.0
    assert saved["zero_shot"]["confusion"][0] == [1, 1, 0, 0, 0, 0]
    assert saved["retrieval"]["unique_captions"] == 6
    assert saved["skipped"] == {"linear_probe": "no training set given"}
    assert len(saved["gallery"]["queries"]) == 6 and len(saved["gallery"]["indices"][0]) == 3
    # gallery row 0 ("a photo of a cat."): image 0 and image 5 score highest on class 0; both precision flags known
    assert saved["gallery"]["indices"][0][:2] == [0, 5]
    for name in ("confusion.png", "per_class.png", "gallery.png"):
        assert_png(tmp_path / "eval" / name)


def test_evaluate_run_end_to_end_tiny_model(tmp_path, tiny_model_cfg):
    import dataclasses
    import json

    from vislang.factory import fit_config_to_tokenizer
    from vislang.tokenizers import Tokenizer

    classnames = ["circle", "square", "triangle"]
    g = torch.Generator().manual_seed(0)
    n = 60
    labels = np.arange(n) % 3
    captions = [f"a photo of a {classnames[y]} number {i % 7}" for i, y in enumerate(labels)]
    tokenizer = Tokenizer.train(captions + classnames, vocab_size=200, context_length=12)
    cfg = fit_config_to_tokenizer(dataclasses.replace(tiny_model_cfg), tokenizer)
    model = vislang.create_model(cfg)
    v = cfg.vision
    images = torch.randint(0, 256, (n, v.channels, v.image_size, v.image_size), dtype=torch.uint8, generator=g)
    test = FakePrepared(images, labels, classnames, captions)
    train = FakePrepared(images.flip(-1), labels, classnames, captions)
    out = evaluate_run(model, tokenizer, test, tmp_path, train_dataset=train, probe_max_train=40)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(out))
    assert set(saved["headline"]) >= {"zero_shot_top1", "text_to_image_R@1", "image_to_text_R@1"}
    assert 0 <= saved["zero_shot"]["top1"] <= 1 and saved["zero_shot"]["chance"] == pytest.approx(1 / 3)
    assert saved["retrieval"]["unique_captions"] == len(set(captions))
    assert saved["linear_probe"]["n_train"] == 40 and 0 <= saved["linear_probe"]["accuracy"] <= 1
    assert saved["skipped"] == {}
    for name in ("confusion.png", "per_class.png", "gallery.png"):
        assert_png(tmp_path / name)

    unlabelled = FakePrepared(images, None, None, captions)  # captions only: zero-shot and probe are skipped
    out = evaluate_run(model, tokenizer, unlabelled, tmp_path / "u", train_dataset=unlabelled)
    assert "zero_shot" not in out and set(out["skipped"]) == {"zero_shot", "linear_probe"}
    assert "text_to_image_R@1" in out["headline"]

    ids = FakePrepared(images, np.arange(n), None, captions)  # labels that are item ids (shapes scenes): no probe
    out = evaluate_run(model, tokenizer, ids, tmp_path / "ids", train_dataset=ids)
    assert out["skipped"]["linear_probe"] == "the labels are per-item ids, not classes"
