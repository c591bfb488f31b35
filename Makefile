# vislang: every command a new user needs. `make demo` trains + evaluates; `make test` runs the test suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vislang-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: help install demo test lint bench clean fashion-mnist openclipart java text-assets

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' Makefile | sed 's/:.*##/\t/'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[assets,bench,serve,deploy,video,dev]'
	@touch $(STAMP)

install: $(STAMP)  ## create .venv with pinned dependencies

# For `make test` a missing Fashion-MNIST is not fatal: the tests that read it are skipped, saying how to install it.
FASHION_MNIST_MISSING = $(if $(FASHION_MNIST_OPTIONAL),echo "(the tests that read it are skipped)",exit 1)

fashion-mnist:  ## install the Fashion-MNIST Debian package (as root), or say how
	@if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist) \
	  || { echo "could not install dataset-fashion-mnist"; $(FASHION_MNIST_MISSING); }; \
	else echo "Fashion-MNIST is missing. Run: sudo apt-get install dataset-fashion-mnist"; $(FASHION_MNIST_MISSING); fi

openclipart:  ## install the OpenClipart Debian packages (as root), or say how
	@if [ -d /usr/share/openclipart/png ] && [ -d /usr/share/openclipart/svg ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q openclipart-png openclipart-svg; \
	else echo "OpenClipart is missing. Run: sudo apt-get install openclipart-png openclipart-svg"; exit 1; fi

TEXT_DEBS := tesseract-ocr tesseract-ocr-chi-sim tesseract-ocr-chi-sim-vert tesseract-ocr-eng fonts-noto-cjk fonts-wqy-zenhei fonts-wqy-microhei
text-assets:  ## install CJK fonts and Tesseract (Chinese + English) for reading text in images (as root), or say how
	@if command -v tesseract >/dev/null 2>&1 && fc-list :lang=zh | grep -q . && tesseract --list-langs 2>/dev/null | grep -q chi_sim_vert; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(TEXT_DEBS); \
	else echo "CJK fonts or Tesseract are missing. Run: sudo apt-get install $(TEXT_DEBS)"; exit 1; fi

java:  ## install a Java runtime for METEOR (caption-eval; pycocoevalcap comes with `make install`), or say how
	@if command -v java >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q default-jre-headless; \
	else echo "Java is missing (METEOR needs it; captions are scored without it). Run: sudo apt-get install default-jre-headless"; exit 1; fi

demo: $(STAMP) fashion-mnist  ## train + evaluate the default model on Fashion-MNIST, write runs/demo/report.html
	$(VENV)/bin/vislang demo --out runs/demo $(DEMO_ARGS)

test: FASHION_MNIST_OPTIONAL := 1
test: $(STAMP) fashion-mnist  ## run the test suite (what CI runs); installs Fashion-MNIST as root, else skips its tests
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m pytest -q -m "not slow and not gpu"

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m ruff format --check src tests benchmarks examples

bench: $(STAMP) fashion-mnist  ## throughput against OpenCLIP on the same config and data
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
