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
	$(PY) -m pip install --quiet -e ".[dev,s3prl,onnx,espnet,hf]"
	@# espnet 202511 beside the venv's packages, without its dependencies (they would replace the pinned
	@# torch): the reference for models/espnet.py's tests and the latency peer. Optional: without it
	@# those tests skip, saying why.
	$(PY) -m pip install --quiet --no-deps --upgrade --target $(VENV)/espnet espnet==202511 torch_complex==0.4.4 \
		&& $(PY) -c "import os, site; open(os.path.join(site.getsitepackages()[0], 'espnet-aside.pth'), 'w').write(os.path.abspath('$(VENV)/espnet') + '\n')" \
		|| echo "espnet could not be installed: the ESPnet reference tests will skip"
	touch $@

# The linter and the formatter's check (ruff, configured in pyproject.toml), the suite, then its precision tests again with the instruction-set caps of an ordinary AVX2 CPU
# (ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA, models/precision.py), so that both CPU classes' paths are
# tested whichever machine runs it. The slowest tests are listed (--durations).
SIMULATED_AVX2 := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
test: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q tests --durations=15
	$(SIMULATED_AVX2) $(PY) -m pytest -q tests/test_precision.py -p no:cacheprovider

# The main job on the embedded mini corpus: corpus -> preparation -> training of the mini baseline
# -> evaluation on mini-test -> analysis report -> reuse-plan suggestion -> retrofit of the baseline
# to the best two-group plan (short fine-tuning) -> its evaluation and PAR coverage against the
# baseline -> CPU latency of both -> the final table. From a fresh clone, set-up included, on 2 cores of a Xeon
# (AVX-512 BF16 + AMX): 13 min 38 s capped to AVX2 (fp32), 13 min 59 s as itself (bf16); on 2 cores of an
# AMD EPYC (Zen 4) capped to AVX2: 12 min 4 s. README.md.
MINI := --data.data_dir $(EXP)/data --trainer.enable_progress_bar false
MINI_SIZE := --d-model 96 --num-layers 4 --ffn-dim 384 --kernel-size 15
# $(call timed,NAME,COMMAND): run COMMAND and append "NAME<TAB>seconds" to $(EXP)/stages.tsv
timed = echo "== $(1) ($$(date +%H:%M:%S))"; s=$$(date +%s); $(2) && printf '%s\t%s\n' "$(1)" $$(( $$(date +%s) - s )) >> $(EXP)/stages.tsv

demo: setup $(EXP)/data/.done
	rm -rf $(EXP)/train $(EXP)/retrofit $(EXP)/stages.tsv
	@$(PY) -c "from models.precision import cpu_description as d, resolve_training_precision as r; print('CPU:', d()); print(r('auto', 'cpu').describe())"
	$(call timed,train baseline,$(PY) train.py fit --config recipes/mini/base.yaml --config recipes/mini/conformer_1x4.yaml \
		$(MINI) --trainer.default_root_dir $(EXP)/train)
	$(call timed,evaluate baseline,$(PY) evaluate.py --ckpt $(EXP)/train/checkpoints/last.ckpt --sets mini-test --out $(EXP)/eval)
	$(call timed,report,$(PY) -m analysis report --ckpt $(EXP)/train/checkpoints/last.ckpt --manifest mini-test \
		--probe-train mini-dev --out $(EXP)/report)
	$(call timed,suggest-reuse,$(PY) -m analysis suggest-reuse --ckpt $(EXP)/train/checkpoints/last.ckpt \
		--manifest mini-dev --out $(EXP)/suggest)
	$(call timed,train retrofit,$(PY) train.py fit --config recipes/mini/base.yaml --config recipes/mini/retrofit.yaml \
		--model.reuse "$$($(PY) -m analysis.demo best-plan $(EXP)/suggest/suggest.json --groups 2)" \
		--model.init_from $(EXP)/train/checkpoints/last.ckpt $(MINI) --trainer.default_root_dir $(EXP)/retrofit)
	$(call timed,evaluate retrofit,$(PY) evaluate.py --ckpt $(EXP)/retrofit/checkpoints/last.ckpt --sets mini-test \
		--out $(EXP)/eval_retrofit)
	$(call timed,PAR coverage,$(PY) -m analysis par --ckpt $(EXP)/retrofit/checkpoints/last.ckpt --manifest mini-test \
		--reference $(EXP)/train/checkpoints/last.ckpt --out $(EXP)/report_retrofit)
	$(call timed,latency,$(PY) -m analysis.latency --reuse "1(H4)x4" \
		"$$($(PY) -m analysis.demo best-plan $(EXP)/suggest/suggest.json --groups 2)" $(MINI_SIZE) \
		--lengths 64 128 256 --runs 60 --rounds 6 --warmup 5 --train-runs 0 --no-peer --no-materialised \
		--include-frontend --quiet --json $(EXP)/latency.json > /dev/null)
	@echo
	@echo "corpus      $(EXP)/corpus (LibriSpeech layout + alignments)"
	@echo "prepared    $(EXP)/data (manifests, bpe.model, cmvn.json, report.json)"
	@echo "checkpoints $(EXP)/train/checkpoints (baseline), $(EXP)/retrofit/checkpoints (retrofit)"
	@echo "logs        $(EXP)/train/csv, $(EXP)/retrofit/csv (and tensorboard/)"
	@echo "evaluation  $(EXP)/eval/results.json, $(EXP)/eval_retrofit/results.json (+ <set>.hyp.tsv)"
	@echo "analysis    $(EXP)/report/*.png, report.json; $(EXP)/report_retrofit (PAR coverage vs the baseline)"
	@echo "suggestion  $(EXP)/suggest/suggest.json, similarity.png, candidates.png"
	@$(PY) -m analysis.demo table $(EXP)

$(EXP)/corpus/.done: | setup
	@echo "== synthesise the mini corpus ($$(date +%H:%M:%S))"
	$(PY) -m data.mini $(EXP)/corpus
	touch $@

$(EXP)/data/.done: $(EXP)/corpus/.done
	@echo "== prepare it ($$(date +%H:%M:%S))"
	$(PY) -m data.prepare --root $(EXP)/corpus --alignments $(EXP)/corpus/alignments --out $(EXP)/data
	touch $@

clean:
	rm -rf $(EXP)
