# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXP ?= exp/demo

.PHONY: setup test demo clean

setup: $(STAMP)

# Re-installs only when pyproject.toml changes (idempotent).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,s3prl]"
	touch $@

test: setup
	$(PY) -m pytest -q tests

# The main job on the embedded mini corpus: corpus -> preparation -> training of the mini baseline
# -> evaluation on mini-test -> analysis report. About 17 minutes on 2 CPU cores.
demo: setup $(EXP)/data/.done
	rm -rf $(EXP)/train
	$(PY) train.py fit --config recipes/mini/base.yaml --config recipes/mini/conformer_1x4.yaml \
		--data.data_dir $(EXP)/data --trainer.default_root_dir $(EXP)/train
	$(PY) evaluate.py --ckpt $(EXP)/train/checkpoints/last.ckpt --sets mini-test --out $(EXP)/eval
	$(PY) -m analysis report --ckpt $(EXP)/train/checkpoints/last.ckpt --manifest mini-test \
		--probe-train mini-dev --out $(EXP)/report
	@echo
	@echo "corpus      $(EXP)/corpus (LibriSpeech layout + alignments)"
	@echo "prepared    $(EXP)/data (manifests, bpe.model, cmvn.json, report.json)"
	@echo "checkpoint  $(EXP)/train/checkpoints/last.ckpt (and the best by dev WER)"
	@echo "logs        $(EXP)/train/csv, $(EXP)/train/tensorboard"
	@echo "evaluation  $(EXP)/eval/results.json, $(EXP)/eval/mini-test.hyp.tsv"
	@echo "analysis    $(EXP)/report/*.png, $(EXP)/report/report.json"
	@$(PY) -c "import json; r = json.load(open('$(EXP)/eval/results.json'))['sets']['mini-test']; \
		print(f\"mini-test WER: greedy {r['greedy']['wer']:.2f} %, beam {r['beam']['wer']:.2f} %\")"

$(EXP)/corpus/.done: | setup
	$(PY) -m data.mini $(EXP)/corpus
	touch $@

$(EXP)/data/.done: $(EXP)/corpus/.done
	$(PY) -m data.prepare --root $(EXP)/corpus --alignments $(EXP)/corpus/alignments --out $(EXP)/data
	touch $@

clean:
	rm -rf $(EXP)
