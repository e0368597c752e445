"""Training with Lightning: the module (:mod:`training.module`), the callbacks
(:mod:`training.callbacks`) and the command line of ``train.py`` (:mod:`training.cli`)."""
