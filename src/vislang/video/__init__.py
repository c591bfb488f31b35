"""Video: reading with PyAV, synthetic shapes movies with ground truth, shot boundaries, key frames, summaries and
moments. ``vislang video summarize`` (cli/video.py) and video indexes (index/video.py) are built on it."""
