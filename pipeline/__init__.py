"""Kaggle image-competition pipeline: folds, timm fine-tuning, Optuna LR tuning, OOF ensembles,
validated submissions.

The package is built in layers; a module imports only from its own layer or the layers before it
(``tests/test_layers.py`` checks it, imports inside functions included):

``core``       errors, atomic files, locks, torchrun ranks, memory: nothing of the pipeline
``domain``     task types, metrics, image transforms by name: what a competition is made of
``config``     the validated config (schema) and where every artifact lives (paths)
``data``       train/test/folds tables, image files, the image cache, datasets, fold splits
``engine``     backbones, checkpoints, the training loop and runtime, frozen features, the probe
``training``   one fold's trainer and its collaborators, fold fingerprints, aggregation, budgets,
               the tuned-LR contract, pseudo-labelled rows
``tracking``   experiment trackers (MLflow, TensorBoard): told what happened, never asking
``ensembles``  blends, post-processing, scores and honesty, submission files, inference
``stages``     one thin module per CLI stage (``run_<stage>(cfg)``); no stage imports another
``workflows``  stages chained into one command (``make all``), and the whole run's time budget
``bench``      the benchmark sections behind ``make bench``
``cli``        the command line: parses arguments, runs stages (and chains them); ``__main__`` calls it
"""

LAYERS = ("core", "domain", "config", "data", "engine", "training", "tracking", "ensembles", "stages", "workflows",
          "bench", "cli", "__main__")

__version__ = "0.1.0"
