# Kaggle image-competition pipeline. `make help` lists the targets.
CONFIG ?= configs/demo.yaml
ARGS ?=
PYTHON ?= .venv/bin/python
JOBS ?= 1
WORKERS ?= 1
FILE ?=
MESSAGE ?=
FROM ?=
DATA ?=
NAME ?=
BUDGET ?=
SETS ?=
RECIPES ?=
RUN = $(PYTHON) -m pipeline

.DEFAULT_GOAL := help
.PHONY: help install init demo-data folds all pretrain train-folds lr-find tune ensemble label-issues pseudo predict bundle leaderboard submit lb-sync bench bench-suite demo test clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-13s\033[0m %s\n", $$1, $$2}'
	@echo "  variables: CONFIG=$(CONFIG) ARGS='key.sub=value ...' JOBS=N WORKERS=N FILE=... MESSAGE=... FROM=... DATA=... NAME=... BUDGET=..."

.venv/.installed: pyproject.toml
	test -x $(PYTHON) || python3 -m venv .venv
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e '.[dev]'
	touch $@

install: .venv/.installed ## create .venv and install the project with its dev extra

init: .venv/.installed ## DATA=data/<competition> [NAME=...]: infer configs/<name>.yaml, write runs/<name>/data_report.md
	@test -n "$(DATA)" || { echo "usage: make init DATA=data/<competition> [NAME=<name>] [ARGS=data.id_column=...]" >&2; exit 2; }
	$(RUN) init "$(DATA)" $(if $(NAME),--name "$(NAME)") $(ARGS)

demo-data: .venv/.installed ## write the digits demo data into data/digits/
	$(RUN) demo-data

folds: .venv/.installed ## split the train table into folds: folds/<exp>.csv
	$(RUN) folds -c $(CONFIG) $(ARGS)

train-folds: .venv/.installed ## train every backbone on every fold (JOBS=N folds in parallel)
	$(RUN) train -c $(CONFIG) --jobs $(JOBS) $(ARGS)

all: .venv/.installed ## folds, train, ensemble, leaderboard in one go (BUDGET=minutes: planned across backbones)
	$(RUN) all -c $(CONFIG) $(if $(BUDGET),--budget $(BUDGET)) $(ARGS)

pretrain: .venv/.installed ## pretrain.backbones on pretrain.data: runs/<exp>/<id>/pretrained.safetensors
	$(RUN) pretrain -c $(CONFIG) $(ARGS)

lr-find: .venv/.installed ## LR range test per backbone (loss-vs-LR plot and suggestion)
	$(RUN) lr-find -c $(CONFIG) $(ARGS)

tune: .venv/.installed ## Optuna LR search per backbone (WORKERS=N processes on one study)
	$(RUN) tune -c $(CONFIG) --workers $(WORKERS) $(ARGS)

ensemble: .venv/.installed ## ensemble OOF predictions and write submissions/<exp>-<method>.csv
	$(RUN) ensemble -c $(CONFIG) $(ARGS)

label-issues: .venv/.installed ## likely label errors from a model's OOF predictions (cleanlab): runs/<exp>/label_issues.{csv,png}
	$(RUN) label-issues -c $(CONFIG) $(ARGS)

pseudo: .venv/.installed ## pseudo-label test images with FROM=<ensemble method or model id>, train <exp>-pseudo, print the CV change
	$(RUN) pseudo -c $(CONFIG) --from "$(FROM)" --train $(ARGS)

predict: .venv/.installed ## predict a test folder from the fold checkpoints (ARGS="--test-dir D --sample S --ensemble M")
	$(RUN) predict -c $(CONFIG) $(ARGS)

bundle: .venv/.installed ## bundles/<exp>/ for a Kaggle code competition: weights, wheel, predict.py (ARGS=--fp16)
	$(RUN) bundle -c $(CONFIG) $(ARGS)

leaderboard: .venv/.installed ## compare every model and ensemble: submissions/leaderboard.csv
	$(RUN) leaderboard -c $(CONFIG) $(ARGS)

submit: .venv/.installed ## send FILE with MESSAGE through the official kaggle CLI
	$(RUN) submit -c $(CONFIG) --file "$(FILE)" -m "$(MESSAGE)" $(ARGS)

lb-sync: .venv/.installed ## read public LB scores from kaggle into the leaderboard
	$(RUN) lb-sync -c $(CONFIG) $(ARGS)

bench: .venv/.installed ## speed ratios, tuned vs default LRs, LP-FT, finetune (CONFIG=configs/scenes.yaml ARGS="--sections finetune") -> BENCHMARKS.md
	$(RUN) bench -c $(CONFIG) $(ARGS)

bench-suite: .venv/.installed ## anchor, fast and budget on every devdata set (SETS=a,b RECIPES=... BUDGET=10) -> benchmarks/suite.csv
	$(RUN) bench -c $(CONFIG) --sections suite $(if $(SETS),--sets $(SETS)) $(if $(RECIPES),--recipes $(RECIPES)) $(if $(BUDGET),--budget $(BUDGET)) $(ARGS)

demo: .venv/.installed ## the whole pipeline on the digits demo data
	@mkdir -p runs && rm -f runs/.demo_started && { [ -d runs/demo ] || date +%s > runs/.demo_started; }
	$(RUN) demo-data
	$(RUN) folds -c $(CONFIG) $(ARGS)
	$(RUN) tune -c $(CONFIG) $(ARGS)
	$(RUN) train -c $(CONFIG) --jobs $(JOBS) $(ARGS)
	$(RUN) ensemble -c $(CONFIG) $(ARGS)
	$(RUN) leaderboard -c $(CONFIG) $(ARGS)
	$(RUN) score -c $(CONFIG) --file submissions/demo-hill_climb.csv --solution data/digits/solution.csv $(ARGS)
	$(RUN) bundle -c $(CONFIG) --ensemble hill_climb $(ARGS)
	@# the bundle as a Kaggle notebook runs it must reproduce the hill-climb submission byte for byte
	$(PYTHON) bundles/demo/predict.py --test-dir data/digits/test --sample data/digits/sample_submission.csv \
		--out runs/demo-bundle-submission.csv
	cmp runs/demo-bundle-submission.csv submissions/demo-hill_climb.csv && echo "bundle: reproduces submissions/demo-hill_climb.csv"
	@# only a run that started without runs/demo is timed: a re-run skips finished work
	@if [ -f runs/.demo_started ]; then $(PYTHON) -c "import json, time; s = int(open('runs/.demo_started').read()); \
	json.dump({'seconds': time.time() - s}, open('runs/demo_wall_time.json', 'w')); \
	print(f'make demo: {(time.time() - s) / 60:.1f} min end to end')" && rm -f runs/.demo_started; fi

test: .venv/.installed ## lint (ruff), then run the test suite (CPU, offline)
	$(PYTHON) -m ruff check pipeline tests
	$(PYTHON) -m pytest -q

clean: ## remove generated runs, folds and submissions (keeps data and .venv)
	rm -rf runs bundles folds/*.csv submissions/*.csv submissions/*.md submissions/*.png
