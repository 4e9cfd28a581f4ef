# patternnet: two commands on a fresh machine.
#   make demo   set up, then run the built-in Fashion-MNIST demo (figures in demo-output/)
#   make demo-vit   the same demo on a small Vision Transformer (figures in demo-output-vit/)
#   make test   set up, then lint and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch from the local disk; torchvision only exists here beside torch 2.14.1.
TORCH_WITH_VISION ?= torch==2.14.1 torchvision==0.29.1
TORCH_PLAIN ?= torch==2.13.0

.PHONY: venv test lint demo demo-vit fashion-mnist browser opencv-libs bench bench-all clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml Makefile | $(BIN)/activate
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_WITH_VISION) || $(BIN)/pip install -q $(TORCH_PLAIN)
	$(BIN)/pip install -q -e '.[test,viz]'
	# zennit is a test-only peer; its torchvision requirement is met above (or its tests skip)
	$(BIN)/pip install -q --no-deps zennit
	# lxt (AttnLRP) is the test-only reference of lrp_attnlrp; lxt 2.1 needs transformers
	# 4.52.4 (with 5.x `import lxt.efficient` fails); its other requirements (bitsandbytes,
	# open_clip_torch, accelerate) are not imported by lxt.efficient and are left out
	$(BIN)/pip install -q --no-deps lxt==2.1
	$(BIN)/pip install -q transformers==4.52.4 tabulate
	touch $@

venv: $(VENV)/.installed

fashion-mnist:
	@if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
	  echo "installing the Debian package dataset-fashion-mnist"; \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || \
	  echo "could not install dataset-fashion-mnist; pass --data DIR with the IDX files"; \
	fi

# headless Chromium opens report.html in tests/test_report.py (Debian package chromium)
browser:
	@if ! command -v chromium >/dev/null 2>&1; then \
	  echo "installing the Debian package chromium (the report's browser test)"; \
	  (apt-get update -qq && apt-get install -y -qq chromium) || \
	  echo "could not install chromium; the browser tests will skip"; \
	fi

# Quantus (a test extra) imports OpenCV, which needs libGL and GLib (Debian libgl1, libglib2.0-0)
opencv-libs:
	@if ! ldconfig -p | grep -q 'libGL.so.1' || ! ldconfig -p | grep -q 'libgthread-2.0.so.0'; then \
	  echo "installing the Debian packages libgl1 libglib2.0-0 (OpenCV, imported by Quantus)"; \
	  (apt-get update -qq && apt-get install -y -qq libgl1 libglib2.0-0) || \
	  echo "could not install libgl1/libglib2.0-0; the Quantus tests will fail to import cv2"; \
	fi

lint: venv
	$(BIN)/ruff check src tests perf

test: venv browser opencv-libs
	$(BIN)/ruff check src tests perf
	$(BIN)/python -m pytest -q

demo: venv fashion-mnist
	$(BIN)/patternnet demo

demo-vit: venv fashion-mnist
	$(BIN)/patternnet demo --model vit

# The headline (README and perf/README): the whole default fit against forward and the
# floor, VGG16 and ResNet-50, 64 images, batch 16, 2 threads (about an hour on 2 busy
# cores), the fixed cost of one call, then the table both READMEs show.
bench: venv
	$(BIN)/python -m perf.fit --whole --model vgg16 --images 64 --batch 16 --threads 2 --repeats 2
	$(BIN)/python -m perf.fit --whole --model resnet50 --images 64 --batch 16 --threads 2 --repeats 2
	$(BIN)/python -m perf.setup --model vgg16 --images 2 --threads 2 --repeats 2
	$(BIN)/python -m perf.table

# Every other benchmark (explain, fit per batch, precision, scaling, checkpoints).
bench-all: venv
	$(BIN)/python -m perf.run

clean:
	rm -rf $(VENV) demo-output demo-output-vit .pytest_cache
