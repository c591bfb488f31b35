"""A seconds-long training config shared by the tests that need a trained model."""

TINY = [
    "model_name=shapes-cnn",
    "model.vision.width=4",
    "model.vision.depth=2",
    "model.vision.image_size=24",
    "model.text.width=16",
    "model.text.layers=1",
    "model.text.heads=2",
    "model.text.vocab_size=200",
    "model.embed_dim=16",
    "data.train=shapes",
    "data.val_split=val",
    "progress=false",
    "threads=1",
]
