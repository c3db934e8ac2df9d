r"""Base config for the sparsejax experiments (dense training of a 1-D CNN on MNIST-1D).

Every method file (``rigl.py``, ``set.py``, ...) starts from :func:`get_config` and changes
``config.dst``. Launch (dense baseline)::

  python -m experiments.main --config experiments/configs/default.py --workdir /tmp/sparsejax_default

Presets (``file.py:preset``, comma-separated): ``smoke`` (a few dozen steps on a small
model and dataset, seconds; used by the tests and notebooks).
Override any field: ``--config.dst.sparsity=0.95 --config.num_train_steps=3000``. The config
is locked, so a misspelt field is an error.

The ``config.dst`` vocabulary (ECOSYSTEM.md §1 row 4):

* ``method``: ``dense``, ``static``, ``set``, ``rigl``, ``srigl``, ``gmp``, ``granet``,
  ``nm_sr_ste``.
* ``sparsity``: fraction of zeros over the sparse layers (not density); for ``gmp`` and
  ``granet`` the final sparsity of the schedule.
* ``distribution``: ``uniform``, ``erdos_renyi``, ``erk`` or ``global`` (one magnitude
  ranking across the sparse layers).
* ``update_every``: ΔT, steps between mask updates.
* ``start_step``: first step that may update masks (exclusive, see ``sparsejax.dynamic_sparse``).
* ``end_fraction``: mask updates stop at ``end_fraction · num_train_steps`` (0.75 as RigL/SRigL).
* ``drop_fraction``, ``drop_fraction_decay``: α and its decay (``cosine`` or ``constant``).
* ``structure``: ``unstructured``, ``nm:2:4`` (any ``nm:N:M``), ``fan_in`` or ``block:HxW``
  (``h × w`` blocks of the kernel's ``[fan_in, n_out]`` view, all kept or all pruned).
* ``drop``, ``grow``: criterion names (registered with ``sparsejax.register_criterion``);
  empty = the method's default.
* ``grow_init``: value of newly grown weights.
* ``keep_first_dense``, ``keep_last_dense``: keep the first/last kernel dense.
* ``gamma_sal``: SRigL's neuron-ablation saliency threshold γ_sal.
* ``ablation_fan_in``: SRigL's ablation threshold is γ_sal times the ``sparse`` (default, the
  reference code's) or the ``dense`` fan-in.
* ``seed``: seed of the initial masks and of random criteria.
* ``init``: the masks a method starts from: ``""`` (the method's default: random masks,
  dense for ``gmp``/``granet``), ``random``, ``dense``, ``magnitude`` (top-|w| of the
  initial weights) or ``snip`` (top-|g ⊙ w| with one batch's gradient at initialization,
  Lee et al. 2019); ``sparsejax.prune`` with the run's distribution and structure.
* ``initial_sparsity``, ``power``: the sparsity schedule of ``gmp``/``granet``
  (``s_t = s_f + (s_i − s_f)(1 − (t − t0)/(t_end − t0))^power``, ``t0 = start_step``,
  ``t_end = end_fraction · num_train_steps``; ``sparsejax.gradual_sparsity``).
* ``regrow_end_fraction``: ``granet`` keeps regrowing (sparsity held) until
  ``regrow_end_fraction · num_train_steps`` (0: regrowth stops with the pruning).

``config.sparse_compute=True`` trains the same run with truly sparse layers
(``sparsejax.sparse``: values + CSR topology, native CPU kernels, a separate topology step on
mask updates) instead of masked dense ones; the records have the same keys.

``config.mesh`` (``data``, ``fsdp``, ``model`` axis sizes, ``min_shard_size``) runs the same
experiment on a device mesh, e.g. 8 fake CPU devices::

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.main \
    --config experiments/configs/rigl.py --workdir /tmp/rigl_mesh \
    --config.mesh.data=2 --config.mesh.fsdp=4
"""

import ml_collections

PRESETS = ("smoke",)


def parse_presets(arg: str | None, allowed: tuple[str, ...] = PRESETS) -> set[str]:
  """Splits ``"a,b"`` into ``{"a", "b"}`` and checks every name against ``allowed``."""
  names = {a.strip() for a in (arg or "").split(",") if a.strip()}
  unknown = names - set(allowed)
  if unknown:
    raise ValueError(
      f"Unknown config preset(s) {sorted(unknown)}; allowed: {', '.join(allowed)} "
      "(e.g. --config experiments/configs/rigl.py:smoke)."
    )
  return names


def get_config(arg: str | None = None, *, method: str = "dense") -> ml_collections.ConfigDict:
  """Returns the base config for ``method``; ``arg`` names presets (``"smoke"``).

  The method is set before the presets apply, so that a preset changes only fields the
  method takes (a field a method does not take must keep its default).
  """
  presets = parse_presets(arg)
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Data.
  config.dataset = "mnist1d"  # mnist1d | digits | teacher_student | cifar10 | imagenet2012
  config.data = ml_collections.ConfigDict()
  config.data.num_samples = 5000  # MNIST-1D: 4000 train / 1000 test.
  config.data.mnist1d_seed = 42  # the benchmark's fixed generation seed.
  config.data.cache_dir = ""  # "" = <workdir>/data
  # cifar10 / imagenet2012 (experiments/input_pipeline.py): the tfds directory of TFRecord
  # or ArrayRecord shards, the image size, grain worker processes and reader threads.
  config.data.dir = ""
  config.data.image_size = 224
  config.data.num_workers = 0
  config.data.num_threads = 8

  # Model.
  config.model = "cnn1d"  # mlp | cnn1d | cnn2d | resnet18_cifar | resnet50 | vit_s16
  config.model_kwargs = ml_collections.ConfigDict()
  config.model_kwargs.mlp_features = (300, 100)
  config.model_kwargs.cnn_channels = 64
  config.model_kwargs.cnn2d_channels = (32, 64)
  config.model_kwargs.cnn2d_hidden = 128

  # Optimization.
  config.optimizer = "sgd"  # sgd | adam | adamw
  config.learning_rate = 0.05
  config.momentum = 0.9
  config.nesterov = True
  config.weight_decay = 1e-4
  config.weight_decay_exclude = ""  # regex of param paths not decayed ("" = decay all)
  config.lr_schedule = "cosine"  # constant | cosine | step
  config.lr_boundaries = (0.3, 0.7, 0.9)  # "step": fractions of training
  config.lr_decay_factor = 0.1  # "step": factor at each boundary
  config.warmup_steps = 100
  config.label_smoothing = 0.0
  config.grad_clip_norm = 0.0  # 0 = no clipping
  config.batch_size = 128  # the global batch (over all devices and processes)
  config.eval_batch_size = 0  # 0 = the whole test set in one batch
  config.num_train_steps = 4000

  # Dynamic sparse training.
  config.dst = ml_collections.ConfigDict()
  config.dst.method = method  # dense | static | set | rigl | srigl | gmp | granet | nm_sr_ste
  config.dst.sparsity = 0.9
  config.dst.distribution = "erk"  # uniform | erdos_renyi | erk | global
  config.dst.update_every = 100
  config.dst.start_step = 0
  config.dst.end_fraction = 0.75
  config.dst.drop_fraction = 0.3
  config.dst.drop_fraction_decay = "cosine"  # cosine | constant
  config.dst.structure = "unstructured"  # unstructured | nm:N:M | fan_in | block:HxW
  config.dst.drop = ""  # "" = the method's default criterion
  config.dst.grow = ""
  config.dst.grow_init = 0.0
  config.dst.keep_first_dense = False
  config.dst.keep_last_dense = False
  config.dst.gamma_sal = 0.3
  config.dst.ablation_fan_in = "sparse"  # sparse | dense (SRigL)
  config.dst.seed = 0
  config.dst.init = ""  # "" (method default) | random | dense | magnitude | snip
  config.dst.initial_sparsity = 0.0  # gmp / granet
  config.dst.power = 3.0  # gmp / granet
  config.dst.regrow_end_fraction = 0.0  # granet (0 = end_fraction)
  # Truly sparse compute (sparsejax.sparse): the masked layers store and compute only their
  # active weights (native CPU kernels), same method and trajectory; constant-nnz methods
  # (static, set, rigl, srigl), Dense and Conv layers, one device.
  config.sparse_compute = False

  # Devices: a ("data", "fsdp", "model") mesh of Auto axes (experiments/parallel.py).
  # 1, 1, 1 = one device; one size may be -1 (all remaining devices); at most two sizes > 1.
  # Fake CPU devices:
  # XLA_FLAGS=--xla_force_host_platform_device_count=8.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = 1  # data parallel: the batch is split, params replicated
  config.mesh.fsdp = 1  # FSDP: the batch is split, params sharded along their input axis
  config.mesh.model = 1  # tensor parallel: kernels sharded along their output axis
  config.mesh.min_shard_size = 1024  # params with fewer elements stay replicated

  # Logging, evaluation, checkpoints.
  config.log_every_steps = 100
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 1000
  config.max_checkpoints_to_keep = 2
  config.async_checkpointing = True
  config.progress_every_steps = 0  # 0 = time-based only
  config.progress_every_secs = 10.0
  config.stop_after_step = -1  # >= 0: checkpoint and stop there (simulated preemption)
  config.write_plots = True
  config.tensorboard = False
  config.extra_imports = ()  # modules imported before the optimizer is built
  config.jax_cache_dir = ""  # JAX persistent compilation cache ("" = off)

  if "smoke" in presets:
    apply_smoke(config)
  return config


def apply_smoke(config: ml_collections.ConfigDict) -> None:
  """Shrinks a config to a run of seconds (tests, notebooks); compilation dominates it.

  400 steps on 2000 MNIST-1D samples with a 32-channel CNN: long enough to learn something
  (RigL at 90% sparsity: 38-51% test accuracy over seeds 0-4, static 27-35%), short enough
  to run in the tests. Mask updates every 50 steps for methods with a mask schedule.
  """
  from experiments import builders  # pylint: disable=g-import-not-at-top

  config.data.num_samples = 2000
  config.model_kwargs.mlp_features = (64, 32)
  config.model_kwargs.cnn_channels = 32
  config.model_kwargs.cnn2d_channels = (8, 16)
  config.model_kwargs.cnn2d_hidden = 32
  config.batch_size = 32
  config.learning_rate = 0.1
  config.num_train_steps = 400
  config.warmup_steps = 10
  if "update_every" in builders.METHODS[config.dst.method].fields:  # a mask schedule
    config.dst.update_every = 50
  config.log_every_steps = 50
  config.eval_every_steps = 200
  config.checkpoint_every_steps = 200
  config.progress_every_secs = 5.0
  config.write_plots = False
