# make install | demo | test | lint | format | bench | clean
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= data,hf,dev,carbon,wandb,eval,deepspeed
# DeepSpeed (the tests' Megatron-DeepSpeed checkpoints) installs without compiling its C++/CUDA ops.
export DS_BUILD_OPS = 0
# GPU machines take whatever torch the package's range resolves to; CPU machines pin the local CPU build so
# no CUDA wheels are downloaded.
CONSTRAINTS := $(if $(shell command -v nvidia-smi 2>/dev/null),,-c constraints/cpu.txt)
DEMO_DATA := runs/demo_data
# Two processes; on a machine with one GPU, one (NCCL takes one rank per GPU).
GPUS := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU')
DEMO_NPROC ?= $(if $(filter 1,$(GPUS)),1,2)

# transformers' own Megatron-DeepSpeed BLOOM converter, which the tests run on DeepSpeed's checkpoints: its
# wheels after 4.45 leave it out, so it is taken from that wheel's file.
BLOOM_CONVERTER := $(VENV)/share/bloom/convert_bloom_original_checkpoint_to_pytorch.py

.PHONY: install demo test lint format bench clean

install: $(VENV)/.installed $(BLOOM_CONVERTER)

$(VENV)/.installed: pyproject.toml constraints/cpu.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	touch $@

$(BLOOM_CONVERTER): | $(VENV)/.installed
	$(BIN)/pip download --quiet --no-deps --dest $(VENV)/share/bloom transformers==4.45.2
	$(BIN)/python -c "import sys, zipfile; open(sys.argv[2], 'wb').write(zipfile.ZipFile(sys.argv[1]).read( \
		'transformers/models/bloom/convert_bloom_original_checkpoint_to_pytorch.py'))" \
		$(VENV)/share/bloom/transformers-4.45.2-py3-none-any.whl $@.tmp
	rm $(VENV)/share/bloom/transformers-4.45.2-py3-none-any.whl
	mv $@.tmp $@

$(DEMO_DATA)/stdlib.jsonl: | install
	$(BIN)/bigscience data corpus --output $@

$(DEMO_DATA)/tokenizer.json: $(DEMO_DATA)/stdlib.jsonl
	$(BIN)/bigscience data tokenizer --input $< --output $@ --vocab-size 8192

$(DEMO_DATA)/stdlib_text_document.idx: $(DEMO_DATA)/stdlib.jsonl $(DEMO_DATA)/tokenizer.json
	$(BIN)/bigscience data preprocess --input $< --output-prefix $(DEMO_DATA)/stdlib_text_document \
		--tokenizer $(DEMO_DATA)/tokenizer.json --workers 2 --append-eod

demo: install $(DEMO_DATA)/stdlib_text_document.idx
	rm -rf runs/demo
	$(BIN)/torchrun --standalone --nproc_per_node $(DEMO_NPROC) -m bigscience_train.train experiment=demo
	$(BIN)/torchrun --standalone --nproc_per_node $(DEMO_NPROC) -m evaluation run=runs/demo
	$(BIN)/bigscience report runs/demo

test: install
	$(BIN)/pytest -q --durations=25 tests

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) runs build *.egg-info
