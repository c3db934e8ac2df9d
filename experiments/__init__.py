"""sparsejax experiments: flags-only ``main.py``, ``train.train_and_evaluate``, configs.

Launch: ``python -m experiments.main --config experiments/configs/rigl.py --workdir DIR``.
"""
