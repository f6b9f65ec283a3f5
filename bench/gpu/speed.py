"""Train-step speed on an accelerator: ours (jitted XLA) against the PyTorch twins, same card.

For each group (model x image size x compute dtype), in the priority order of `GROUPS`
(ResNet-50 and ViT-S/16 at 224 px bfloat16 first, then the ResNet-18 and ConvNeXt-V2-Tiny
groups) until `--budget_s` is spent, builds the library's jitted train step for every loss
(`ce`, `proto`, `bcpl`; `bcam_jax.steps.make_train_step`, what train.py runs) and the
PyTorch twin of bench/torch_models.py (eager; `ce` and `bcpl`, the losses it has), then
times them alternately in one loop (`--rounds` rounds, each `--steps` steps of every
variant, blocking only at the end of a variant's steps) so every ratio comes from the
same machine state. `--variants` adds variants of our step to the same loop: model options
(e.g. `batch_norm=custom_vjp`), `conv_lowering=...` and XLA flags (`xla_...=value`, given to
that step's compilation alone, so flag sets are timed against each other in one process);
`--torch_modes` picks the twin's layouts (`eager` NCHW, `channels_last`). Reported per row:

* img/s, and the ratio to the same framework's (and variant's) `ce` step (the paper's
  "negligible overhead": target bcpl/ce <= 1.10), ours/PyTorch at the same loss (target
  >= 1; our first variant against each PyTorch row) and, for every other variant, its
  speed-up over the first variant at the same loss;
* compile time (`lower` + `compile` of our step; the losses of a group compile in
  parallel threads, so each time includes waiting for the others: an upper bound), and
  for `torch.compile` rows the first call;
* MFU: XLA's cost analysis of the compiled step (FLOPs per step) over the step time and
  the card's dense peak for the compute dtype (`PEAK_TFLOPS`: bfloat16 tensor cores for
  bfloat16, TF32 tensor cores for float32, the rate XLA's and cuDNN's default float32
  convolutions and matmuls run at). The same FLOPs divided by the PyTorch step time
  give the twin's MFU;
* memory: XLA's static estimate of our step, and PyTorch's `max_memory_allocated`.

`--max_batch_groups` adds, for those groups, the largest batch that fits: the static
memory of our `ce` and `bcpl` steps at 128 and 256 is extrapolated linearly to 90% of
the device's memory limit (rounded down to a multiple of 128), then both frameworks are
timed there. `--compile_groups` adds `torch.compile` rows (backbone compiled, head eager:
BCPL differentiates the head's gradient). Writes speed.json and speed.md to --out_dir.

  python bench/gpu/speed.py --out_dir=/tmp/speed                 # on a GPU
  python bench/gpu/speed.py --models=resnet18 --sizes=112 --dtypes=bfloat16 --losses=ce,bcpl \
      --variants=default,batch_norm=custom_vjp,xla_gpu_autotune_level=0 --out_dir=/tmp/ab
  JAX_PLATFORMS=cpu python bench/gpu/speed.py --models=resnet18 --sizes=8 --dtypes=float32 \
      --batch=8 --steps=1 --rounds=1 --max_batch_groups= --compile_groups= --out_dir=/tmp/s
"""

import concurrent.futures
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from bcam_jax import data, models, optim, parallel, steps  # noqa: E402
from bcam_jax import objective as objective_lib  # noqa: E402
from bcam_jax.configs import base  # noqa: E402
from bench import common  # noqa: E402

# The models timed: name -> (bcam_jax model, get_model options); each has a PyTorch twin
# (bench/torch_models.py) of the same name. The patchify ConvNeXt needs sides >= 32; the
# ViT-S/16 sides that are multiples of 16 (its grid is side // 16, the position embedding
# made for the size timed); ResNet-50 has the ImageNet stem (torchvision's resnet50).
MODELS = {
  **common.MODEL_VARIANTS,
  'convnext_v2_tiny_patchify': ('convnext_v2_tiny', {'stem_stride': 4}),
  'resnet50': ('resnet50', {'stem': 'imagenet'}),
  'vit_s16': ('vit_s16', {}),
}
# (model, image size, dtype) in the order they are measured, most wanted first: ResNet-50 and
# ViT-S/16 at 224 in bfloat16 (the standard ImageNet-size models), then where users train
# (bfloat16 at 112 and 224, the target group first), then 28 px float32 (the paper's
# setting), then the small stems at 224 (the heaviest: 16x the ImageNet stems' FLOPs).
GROUPS = (
  ('resnet50', 224, 'bfloat16'),
  ('vit_s16', 224, 'bfloat16'),
  ('resnet18', 112, 'bfloat16'),
  ('resnet18_imagenet_stem', 224, 'bfloat16'),
  ('convnext_v2_tiny_patchify', 224, 'bfloat16'),
  ('convnext_v2_tiny', 112, 'bfloat16'),
  ('resnet18', 28, 'float32'),
  ('convnext_v2_tiny', 28, 'float32'),
  ('resnet18_imagenet_stem', 112, 'bfloat16'),
  ('convnext_v2_tiny_patchify', 112, 'bfloat16'),
  ('resnet18_imagenet_stem', 28, 'float32'),
  ('resnet18', 224, 'bfloat16'),
  ('convnext_v2_tiny', 224, 'bfloat16'),
)
LOSSES = ('ce', 'proto', 'bcpl')
TORCH_LOSSES = ('ce', 'bcpl')
TORCH_MODES = ('eager', 'channels_last')
# Dense peak TFLOP/s by card (datasheet, SXM): bfloat16 tensor cores; float32 as TF32.
PEAK_TFLOPS = {
  'H100': {'bfloat16': 989.4, 'float32': 494.7},
  'H200': {'bfloat16': 989.4, 'float32': 494.7},
  'A100': {'bfloat16': 312.0, 'float32': 156.0},
}
TARGETS = {'bcpl_vs_ce': 1.10, 'ours_vs_torch': 1.0}
NUM_CLASSES = 10

_MODELS = flags.DEFINE_list('models', list(MODELS), f'Models, of {list(MODELS)}.')
_SIZES = flags.DEFINE_list('sizes', ['28', '112', '224'], 'Image sides.')
_DTYPES = flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'Compute dtypes.')
_LOSSES = flags.DEFINE_list('losses', list(LOSSES), 'Losses of our step.')
_BATCH = flags.DEFINE_integer('batch', 128, 'Global batch.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Steps per variant per round.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Alternating rounds.')
_TORCH = flags.DEFINE_bool('torch', True, 'Time the PyTorch twins too.')
_TORCH_MODES = flags.DEFINE_list(
  'torch_modes', ['eager', 'channels_last'], f'Layouts of the PyTorch twins: {TORCH_MODES}.'
)
_VARIANTS = flags.DEFINE_list(
  'variants',
  ['default'],
  'Variants of our step timed in the same loop, the first the reference: "default", or '
  '"+"-joined key=value items: a model option (batch_norm=custom_vjp), conv_lowering=..., '
  'or an XLA flag for that compilation (xla_gpu_autotune_level=0). A variant whose options '
  'a model lacks is skipped for that model.',
)
_MAX_BATCH = flags.DEFINE_list(
  'max_batch_groups',
  ['resnet18:112:bfloat16'],
  'model:size:dtype groups timed at the largest batch.',
)
_COMPILE = flags.DEFINE_list(
  'compile_groups',
  ['resnet50:224:bfloat16', 'vit_s16:224:bfloat16', 'resnet18:112:bfloat16', 'resnet18:28:float32'],
  'model:size:dtype groups with torch.compile rows (channels_last).',
)
_BUDGET = flags.DEFINE_float('budget_s', 240.0, 'Stop starting new groups after this long.')
_OUT = flags.DEFINE_string('out_dir', 'bench/results/gpu', 'Where speed.json/md go.')
_MFU_FROM = flags.DEFINE_string(
  'mfu_from',
  None,
  'A speed.json whose FLOPs came from the compiled step (runs before the fix of _flops): '
  "recompute each row's FLOPs here, by lowering only, and write it with its MFU to --out_dir.",
)


def _flops(lowered) -> float | None:
  """FLOPs per call from XLA's cost analysis of the lowered (not yet compiled) step: the
  step as written. The compiled executable's analysis misses work the backend moves into
  library calls (on GPU every cuDNN convolution: 0.1% "MFU" on an H100)."""
  try:
    cost = lowered.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost['flops']) if cost and 'flops' in cost else None


def _peak_flops(dtype: str, kind: str | None = None) -> float | None:
  kind = kind or jax.devices()[0].device_kind
  for card, peaks in PEAK_TFLOPS.items():
    if card in kind:
      return peaks[dtype] * 1e12
  return None


def _device_limit_bytes() -> float | None:
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    stats = {}
  return stats.get('bytes_limit')


def parse_variant(spec: str) -> tuple[dict, dict]:
  """(get_model keyword arguments, XLA compiler options) of a `--variants` item."""
  model_kwargs, compiler_options = {}, {}
  if spec == 'default':
    return model_kwargs, compiler_options
  for item in spec.split('+'):
    key, sep, value = item.partition('=')
    if not sep or not key or not value:
      raise app.UsageError(f'--variants: {item!r} in {spec!r} is not key=value')
    value = {'true': True, 'false': False}.get(value, value)
    if isinstance(value, str) and value.lstrip('-').isdigit():
      value = int(value)
    (compiler_options if key.startswith('xla_') else model_kwargs)[key] = value
  return model_kwargs, compiler_options


class Ours:
  """Our jitted train steps of one model, size and dtype, one per loss, at one batch; the
  model built with `model_kwargs`, each step compiled with `compiler_options`."""

  def __init__(self, name, size, dtype, batch, losses, model_kwargs=None, compiler_options=None):
    self.mesh = parallel.make_mesh()
    self.info = data.dataset_info('mnist')
    model_name, options = MODELS[name]
    self.model = models.get_model(model_name, NUM_CLASSES, **options, **(model_kwargs or {}))
    self.compiler_options = compiler_options or None
    self.size, self.dtype, self.batch = size, dtype, batch
    config = base.get_base_config()
    self.tx, self.schedule = optim.make_optimizer(config.optimizer, total_steps=10_000)
    self.init = jax.jit(
      steps.make_init_fn(self.model, self.tx, seed=0, image_size=size),
      out_shardings=parallel.replicated(self.mesh),
    )
    rng = np.random.default_rng(0)
    self.inputs = (
      *parallel.shard_batch(
        self.mesh,
        rng.integers(0, 256, (batch, size, size, 1), dtype=np.uint8),
        rng.integers(0, NUM_CLASSES, batch).astype(np.int32),
      ),
      jax.device_put(
        rng.random((NUM_CLASSES, size, size), np.float32), parallel.replicated(self.mesh)
      ),
    )
    self.losses = losses
    self.compiled, self.states, self.info_rows = {}, {}, {}

  def lower(self, loss):
    objective = objective_lib.Objective(
      kind=loss, metric='l1', num_classes=NUM_CLASSES, prototype_size=self.size
    )
    fn = common.train_step_fn(
      self.model,
      self.tx,
      self.schedule,
      objective,
      self.info,
      self.size,
      dtype=jnp.dtype(self.dtype),
    )
    jitted = jax.jit(fn, out_shardings=parallel.replicated(self.mesh), donate_argnums=0)
    state = self.init()
    return jitted.lower(state, *self.inputs), state

  def compile_all(self):
    """Lowers every loss's step in turn, then compiles them in parallel threads."""
    start = time.perf_counter()
    lowered = {loss: self.lower(loss) for loss in self.losses}

    def compile_one(loss):
      c = lowered[loss][0].compile(compiler_options=self.compiler_options)
      return c, time.perf_counter() - start

    with concurrent.futures.ThreadPoolExecutor(len(self.losses)) as pool:
      done = dict(zip(self.losses, pool.map(compile_one, self.losses)))
    for loss, (compiled, seconds) in done.items():
      self.compiled[loss] = compiled
      self.states[loss] = lowered[loss][1]
      self.info_rows[loss] = {
        'compile_s': seconds,
        'flops_per_step': _flops(lowered[loss][0]),
        **common.static_memory(compiled),
      }

  def runner(self, loss):
    def run(n):
      for _ in range(n):
        self.states[loss], metrics = self.compiled[loss](self.states[loss], *self.inputs)
      jax.block_until_ready(metrics)

    return run


class Theirs:
  """The PyTorch twin's steps of one model, size and dtype, one per loss."""

  def __init__(self, name, size, dtype, batch, compile_backbone=False, channels_last=False):
    import torch  # pylint: disable=import-outside-toplevel

    from bench import torch_models  # pylint: disable=import-outside-toplevel

    self.torch = torch
    self.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    torch.set_float32_matmul_precision('high')  # TF32 matmuls, as XLA's default on GPU
    torch.backends.cudnn.benchmark = True
    rng = np.random.default_rng(0)
    put = lambda a: torch.from_numpy(a).to(self.device)
    self.inputs = (
      put(rng.integers(0, 256, (batch, size, size, 1), dtype=np.uint8)),
      put(rng.integers(0, NUM_CLASSES, batch).astype(np.int64)),
      put(rng.random((NUM_CLASSES, size, size), np.float32)),
    )
    info = data.dataset_info('mnist')
    autocast = torch.bfloat16 if dtype == 'bfloat16' else None
    self.steps = {}
    for loss in TORCH_LOSSES:
      torch.manual_seed(0)
      model = torch_models.build(name, size).to(self.device)
      self.steps[loss] = torch_models.make_train_step(
        model,
        loss,
        info.mean,
        info.std,
        autocast=autocast,
        compile_backbone=compile_backbone,
        channels_last=channels_last,
      )

  def sync(self):
    if self.device == 'cuda':
      self.torch.cuda.synchronize()

  def runner(self, loss):
    def run(n):
      for _ in range(n):
        self.steps[loss](*self.inputs)
      self.sync()

    return run

  def peak_mib(self):
    if self.device != 'cuda':
      return None
    peak = self.torch.cuda.max_memory_allocated() / 2**20
    self.torch.cuda.reset_peak_memory_stats()
    return peak


def _time_alternating(runners: dict, steps_per_round: int, rounds: int) -> dict:
  """Median seconds per step of each runner, the runners alternating within each round."""
  times = {k: [] for k in runners}
  for _ in range(rounds):
    for key, run in runners.items():
      start = time.perf_counter()
      run(steps_per_round)
      times[key].append((time.perf_counter() - start) / steps_per_round)
  return {k: float(np.median(v)) for k, v in times.items()}


def measure_group(
  name, size, dtype, batch, losses, with_torch, compile_torch, variants=('default',)
) -> tuple[list[dict], dict]:
  """Rows for one group: our losses in every variant, the twin's steps in every layout (and
  compiled), at `batch`, all timed in one alternating loop; and why any variant or twin is
  missing."""
  runners, extra, ours, errors = {}, {}, {}, {}
  for spec in variants:
    model_kwargs, compiler_options = parse_variant(spec)
    try:
      ours[spec] = Ours(name, size, dtype, batch, losses, model_kwargs, compiler_options)
      ours[spec].compile_all()
    except Exception as e:  # pylint: disable=broad-except  # an option this model lacks, a flag
      # this backend rejects, OOM: the other variants are still timed
      errors[f'ours {spec}'] = f'{type(e).__name__}: {str(e)[:300]}'
      print(f'# {name} {size} {dtype}: variant {spec} skipped: {errors[f"ours {spec}"]}')
      ours.pop(spec, None)
      continue
    for loss in losses:
      run = ours[spec].runner(loss)
      run(2)  # warm-up
      runners[('ours', spec, loss)] = run
      extra[('ours', spec, loss)] = ours[spec].info_rows[loss]
  if with_torch:
    modes = [(f'torch {m}', False, m == 'channels_last') for m in _TORCH_MODES.value]
    modes += [('torch.compile channels_last', True, True)] if compile_torch else []
    for framework, compiled, channels_last in modes:
      try:
        theirs = Theirs(name, size, dtype, batch, compiled, channels_last)
        for loss in TORCH_LOSSES:
          run = theirs.runner(loss)
          start = time.perf_counter()
          run(1)
          first = time.perf_counter() - start
          run(1)
          extra[(framework, '', loss)] = {
            'compile_s': first if compiled else None,
            'torch_peak_mib': theirs.peak_mib(),
          }
          runners[(framework, '', loss)] = run
      except Exception as e:  # pylint: disable=broad-except  # e.g. OOM, compile failure
        errors[framework] = f'{type(e).__name__}: {str(e)[:300]}'
        print(f'# {framework} {name} {size} {dtype}: {errors[framework]}', flush=True)
  seconds = _time_alternating(runners, _STEPS.value, _ROUNDS.value)
  peak = _peak_flops(dtype)
  first = next(iter(ours), None)
  rows = []
  for (framework, variant, loss), step_s in seconds.items():
    flops = ours[first].info_rows.get(loss, {}).get('flops_per_step') if first else None
    ce_s = seconds.get((framework, variant, 'ce'))
    ours_s = seconds.get(('ours', first, loss))
    row = {
      'framework': framework,
      'variant': variant,
      'model': name,
      'image_size': size,
      'dtype': dtype,
      'batch': batch,
      'loss': loss,
      'step_ms': 1e3 * step_s,
      'img_s': batch / step_s,
      'vs_ce': step_s / ce_s if ce_s else None,
      'ours_speedup': step_s / ours_s if ours_s and framework != 'ours' else None,
      'vs_first_variant': ours_s / step_s
      if ours_s and framework == 'ours' and variant != first
      else None,
      'mfu': flops / step_s / peak if flops and peak else None,
      'tflops': flops / step_s / 1e12 if flops else None,
      **extra[(framework, variant, loss)],
    }
    rows.append(row)
  return rows, errors


def max_batch(name, size, dtype) -> int | None:
  """The largest multiple of 128 whose ce and bcpl steps fit in 90% of device memory, by
  linear extrapolation of XLA's static estimate at batch 128 and 256."""
  limit = _device_limit_bytes()
  if not limit:
    return None
  per = {}
  for batch in (128, 256):
    ours = Ours(name, size, dtype, batch, ('ce', 'bcpl'))
    ours.compile_all()
    per[batch] = max(r['static_peak_mib'] or 0.0 for r in ours.info_rows.values())
  slope = (per[256] - per[128]) / 128
  if slope <= 0:
    return None
  fit = (0.9 * limit / 2**20 - (per[128] - 128 * slope)) / slope
  return int(fit // 128) * 128


def _fmt(v, spec):
  return '-' if v is None else format(v, spec)


def table(rows) -> str:
  lines = [
    '| framework | variant | model | size | dtype | batch | loss | img/s | vs ce | '
    'ours faster by | vs first variant | MFU | compile s | mem MiB |',
    '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in rows:
    mem = r.get('static_peak_mib') if r['framework'] == 'ours' else r.get('torch_peak_mib')
    lines.append(
      f'| {r["framework"]} | {r.get("variant") or "-"} | {r["model"]} | {r["image_size"]} | '
      f'{r["dtype"]} | {r["batch"]} | {r["loss"]} | {r["img_s"]:.0f} | '
      f'{_fmt(r["vs_ce"], ".3f")} | {_fmt(r["ours_speedup"], ".2f")} | '
      f'{_fmt(r.get("vs_first_variant"), ".3f")} | {_fmt(r["mfu"], ".1%")} | '
      f'{_fmt(r.get("compile_s"), ".1f")} | {_fmt(mem, ".0f")} |'
    )
  return '\n'.join(lines)


def write(payload: dict, out_dir: str) -> None:
  """speed.json and speed.md (the table, what was skipped, the errors) in `out_dir`."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'speed.json'), 'w', encoding='utf-8') as f:
    json.dump(payload, f, indent=2)
  with open(os.path.join(out_dir, 'speed.md'), 'w', encoding='utf-8') as f:
    f.write(f'# Train-step speed\n\n{payload["machine"]}\n\n{table(payload["rows"])}\n')
    if payload.get('mfu_note'):
      f.write(f'\n{payload["mfu_note"]}\n')
    if payload['skipped']:
      f.write(f'\nNot measured (time budget): {", ".join(payload["skipped"])}\n')
    for key, err in payload['errors'].items():
      f.write(f'\nError in {key}: {err}\n')


def recompute_mfu(path: str, out_dir: str) -> None:
  """Rewrites the FLOPs, TFLOP/s and MFU of every row of `path` from the lowered steps."""
  with open(path, encoding='utf-8') as f:
    payload = json.load(f)
  kind = payload['machine']['device_kind']
  flops = {}
  for r in payload['rows']:
    key = (r['model'], r['image_size'], r['dtype'], r['batch'])
    if key not in flops:
      ours = Ours(*key, LOSSES)
      flops[key] = {loss: _flops(ours.lower(loss)[0]) for loss in LOSSES}
    r['flops_per_step'] = flops[key][r['loss']]
    step_s = r['step_ms'] / 1e3
    peak = _peak_flops(r['dtype'], kind)
    r['tflops'] = r['flops_per_step'] / step_s / 1e12
    r['mfu'] = r['flops_per_step'] / step_s / peak if peak else None
  payload['mfu_note'] = (
    f'MFU: FLOPs per step from the lowered step (lowered on {jax.default_backend()}, '
    f'jax {jax.__version__}; the model FLOPs, the same on every backend) over the step time '
    f'measured on the {kind}, over its dense peak ({PEAK_TFLOPS}); the PyTorch rows use our '
    "step's FLOPs."
  )
  write(payload, out_dir)
  print(table(payload['rows']))


def main(argv):
  del argv
  if _MFU_FROM.value:
    recompute_mfu(_MFU_FROM.value, _OUT.value)
    return
  for spec in _VARIANTS.value:
    parse_variant(spec)  # a malformed item fails before anything compiles
  for flag, valid in ((_TORCH_MODES, TORCH_MODES), (_MODELS, tuple(MODELS))):
    unknown = sorted(set(flag.value) - set(valid))
    if unknown:
      raise app.UsageError(f'--{flag.name}: unknown {unknown}; valid: {", ".join(valid)}')
  start = time.time()
  wanted = [
    g
    for g in GROUPS
    if g[0] in _MODELS.value and str(g[1]) in _SIZES.value and g[2] in _DTYPES.value
  ]
  # Sizes outside GROUPS (a CPU dry run's tiny images) keep the same model x dtype order.
  for size in map(int, _SIZES.value):
    if all(size != g[1] for g in GROUPS):
      wanted += [(m, size, d) for m in _MODELS.value for d in _DTYPES.value]
  machine = common.machine_info()
  try:
    import torch  # pylint: disable=import-outside-toplevel

    machine |= {'torch': torch.__version__, 'cuda': torch.version.cuda}
  except ImportError:
    pass
  os.makedirs(_OUT.value, exist_ok=True)
  print(f'# {machine}', flush=True)
  rows, skipped, errors = [], [], {}

  def save():
    payload = {
      'machine': machine,
      'flags': {
        'batch': _BATCH.value,
        'steps': _STEPS.value,
        'rounds': _ROUNDS.value,
        'variants': _VARIANTS.value,
        'torch_modes': _TORCH_MODES.value,
      },
      'peak_tflops': PEAK_TFLOPS,
      'targets': TARGETS,
      'rows': rows,
      'skipped': skipped,
      'errors': errors,
    }
    write(payload, _OUT.value)

  jobs = [(g, _BATCH.value) for g in wanted]
  jobs += [
    (tuple(int(x) if x.isdigit() else x for x in g.split(':')), 'max') for g in _MAX_BATCH.value
  ]
  for (name, size, dtype), batch in jobs:
    key = f'{name}:{size}:{dtype}:{batch}'
    if time.time() - start > _BUDGET.value:
      skipped.append(key)
      continue
    try:
      losses, variants = tuple(_LOSSES.value), _VARIANTS.value
      if batch == 'max':  # found for, and timed with, the default step only
        batch = max_batch(name, size, dtype)
        if batch is None:
          skipped.append(f'{key} (no device memory limit)')
          continue
        losses, variants = ('ce', 'bcpl'), ('default',)
      compile_torch = f'{name}:{size}:{dtype}' in _COMPILE.value
      new, missing = measure_group(
        name, size, dtype, batch, losses, _TORCH.value, compile_torch, variants
      )
      errors |= {f'{key} {what}': why for what, why in missing.items()}
    except Exception as e:  # pylint: disable=broad-except  # OOM and the like: go on
      errors[key] = f'{type(e).__name__}: {str(e)[:500]}'
      traceback.print_exc()
      save()
      continue
    rows += new
    print(table(new), flush=True)
    save()
  save()
  print(table(rows))
  print(f'wrote {os.path.join(_OUT.value, "speed.json")} in {time.time() - start:.0f} s')


if __name__ == '__main__':
  app.run(main)
