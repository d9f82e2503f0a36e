# gangen: `make demo` trains the demo and writes samples; `make test` runs the suite.
# Both create the virtual environment on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.14.1 torchvision==0.29.1
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
CONFIG ?= configs/r1gan_fashion_mnist.yaml
RUNS   ?= runs/r1gan_fashion_mnist
EPOCHS ?= 3

.PHONY: venv data demo test lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH) || { echo "installing $(TORCH) failed: its CUDA build needs about 6 GB free under $(VENV) (df -h . shows what is left)" >&2; exit 1; }
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Fashion-MNIST from Debian's package (offline). Elsewhere: pass --data.download true --data.root DIR.
data:
	@test -f $(FMNIST) || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist'" >&2; exit 1; fi; }

demo: $(STAMP) data
	$(PY) cli.py fit --config $(CONFIG) --trainer.max_epochs $(EPOCHS)
	$(PY) cli.py generate --ckpt_path "$$(ls -td $(RUNS)/version_*/ | head -n 1)checkpoints/last.ckpt" \
	  --num_samples 64 --output demo_samples.png

test: $(STAMP) data
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check gangen tests cli.py bench
	$(VENV)/bin/ruff format --check gangen tests cli.py bench

clean:
	rm -rf runs lightning_logs demo_samples.png .pytest_cache
