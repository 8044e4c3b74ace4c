# Kaggle image-competition pipeline. `make help` lists the targets.
CONFIG ?= configs/demo.yaml
ARGS ?=
PYTHON ?= .venv/bin/python
JOBS ?= 1
WORKERS ?= 1
FILE ?=
MESSAGE ?=
RUN = $(PYTHON) -m pipeline

.DEFAULT_GOAL := help
.PHONY: help install demo-data folds train-folds lr-find tune ensemble leaderboard submit lb-sync bench demo test clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-13s\033[0m %s\n", $$1, $$2}'
	@echo "  variables: CONFIG=$(CONFIG) ARGS='key.sub=value ...' JOBS=N WORKERS=N FILE=... MESSAGE=..."

.venv/.installed: pyproject.toml
	test -x $(PYTHON) || python3 -m venv .venv
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e '.[dev]'
	touch $@

install: .venv/.installed ## create .venv and install the project with its dev extra

demo-data: .venv/.installed ## write the digits demo data into data/digits/
	$(RUN) demo-data

folds: .venv/.installed ## split the train table into folds: folds/<exp>.csv
	$(RUN) folds -c $(CONFIG) $(ARGS)

train-folds: .venv/.installed ## train every backbone on every fold (JOBS=N folds in parallel)
	$(RUN) train -c $(CONFIG) --jobs $(JOBS) $(ARGS)

lr-find: .venv/.installed ## LR range test per backbone (loss-vs-LR plot and suggestion)
	$(RUN) lr-find -c $(CONFIG) $(ARGS)

tune: .venv/.installed ## Optuna LR search per backbone (WORKERS=N processes on one study)
	$(RUN) tune -c $(CONFIG) --workers $(WORKERS) $(ARGS)

ensemble: .venv/.installed ## ensemble OOF predictions and write submissions/<exp>-<method>.csv
	$(RUN) ensemble -c $(CONFIG) $(ARGS)

leaderboard: .venv/.installed ## compare every model and ensemble: submissions/leaderboard.csv
	$(RUN) leaderboard -c $(CONFIG) $(ARGS)

submit: .venv/.installed ## send FILE with MESSAGE through the official kaggle CLI
	$(RUN) submit -c $(CONFIG) --file "$(FILE)" -m "$(MESSAGE)" $(ARGS)

lb-sync: .venv/.installed ## read public LB scores from kaggle into the leaderboard
	$(RUN) lb-sync -c $(CONFIG) $(ARGS)

bench: .venv/.installed ## speed ratios, tuned vs default LRs, LP-FT, finetune (CONFIG=configs/scenes.yaml ARGS="--sections finetune") -> BENCHMARKS.md
	$(RUN) bench -c $(CONFIG) $(ARGS)

demo: .venv/.installed ## the whole pipeline on the digits demo data
	@mkdir -p runs && rm -f runs/.demo_started && { [ -d runs/demo ] || date +%s > runs/.demo_started; }
	$(RUN) demo-data
	$(RUN) folds -c $(CONFIG) $(ARGS)
	$(RUN) tune -c $(CONFIG) $(ARGS)
	$(RUN) train -c $(CONFIG) --jobs $(JOBS) $(ARGS)
	$(RUN) ensemble -c $(CONFIG) $(ARGS)
	$(RUN) leaderboard -c $(CONFIG) $(ARGS)
	$(RUN) score -c $(CONFIG) --file submissions/demo-hill_climb.csv --solution data/digits/solution.csv $(ARGS)
	@# only a run that started without runs/demo is timed: a re-run skips finished work
	@if [ -f runs/.demo_started ]; then $(PYTHON) -c "import json, time; s = int(open('runs/.demo_started').read()); \
	json.dump({'seconds': time.time() - s}, open('runs/demo_wall_time.json', 'w')); \
	print(f'make demo: {(time.time() - s) / 60:.1f} min end to end')" && rm -f runs/.demo_started; fi

test: .venv/.installed ## run the test suite (CPU, offline)
	$(PYTHON) -m pytest -q

clean: ## remove generated runs, folds and submissions (keeps data and .venv)
	rm -rf runs folds/*.csv submissions/*.csv submissions/*.md submissions/*.png
