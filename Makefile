# Two entry points for a fresh machine: `make demo` and `make test` (see README.md); `make test-fast` runs the unit tests.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
# torch and torchvision are installed first, as a matched pair, before the package pulls anything else.
TORCH_PACKAGES ?= torch==2.14.1 torchvision==0.29.1
OUTPUT_DIR ?= outputs/quickstart_digits
# Extra flags for the demo run, e.g. `make demo DEMO_ARGS="--num_train_epochs 1"`.
DEMO_ARGS ?=
# accelerate launch gives a CPU process one thread unless told otherwise; the demo uses every core.
DEMO_THREADS ?= $(shell nproc 2>/dev/null || echo 1)

# Test processes (pytest-xdist); each runs torch with one thread, so the workers share the cores without contention.
TEST_WORKERS ?= auto

.PHONY: install demo test test-fast bench clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet $(TORCH_PACKAGES)
	$(PYTHON) -m pip install --quiet -e ".[dev]"
	touch $@

demo: install
	$(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		--num_cpu_threads_per_process $(DEMO_THREADS) \
		train_pretrain.py configs/quickstart_digits.yaml --output_dir $(OUTPUT_DIR) $(DEMO_ARGS)
	@echo "metrics ($(OUTPUT_DIR)/all_results.json):"
	@cat $(OUTPUT_DIR)/all_results.json
	@echo "load it:"
	@echo "  from simlap_hf import SimLAPModel"
	@echo "  model = SimLAPModel.from_pretrained(\"$(OUTPUT_DIR)\")"
	$(PYTHON) -c "from simlap_hf import SimLAPModel; model = SimLAPModel.from_pretrained('$(OUTPUT_DIR)'); print(type(model).__name__, model.config.backbone, model.config.id2label)"

test: install
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

# The unit tests only (marker `unit`, see tests/conftest.py): a check of one change in under a minute.
test-fast: install
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q -m unit -n $(TEST_WORKERS)

bench: install
	bash benchmarks/run_all.sh

clean:
	rm -rf $(VENV) outputs .pytest_cache
