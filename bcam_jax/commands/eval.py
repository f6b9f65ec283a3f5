"""Evaluates a trained workdir on the test set and writes `<workdir>/eval/`: metrics.json,
report.md, the figures (confusion, CAM prototypes, error prototypes, overlays) and the same
in TensorBoard (`<workdir>/eval/tensorboard`).

  bcam-eval --config=<config> --workdir=<dir> [--checkpoint=last]
      [--methods=grad_cam,grad_cam_pp,score_cam,evidence] [--num_images=1000]
      [--overlay_selection=misclassified]
      [--n_steps=25 --blur_size=0 --deletion_baseline=black]   # the previous ins/del convention

The config is the one used for training (with the same overrides): a packaged name or a file,
as for bcam-train. In a clone, `python eval.py` is the same command.
"""

from absl import app, flags

from bcam_jax import cli, eval_lib, explain
from bcam_jax.config_validation import ConfigError
from bcam_jax.metric_logging import quiet_library_logs

_DEFAULTS = eval_lib.EvalOptions()
_CONFIG = cli.define_config_flag('config', 'The config used for training: a name or a file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir of the trained run.')
_CHECKPOINT = flags.DEFINE_enum(
  'checkpoint',
  _DEFAULTS.checkpoint,
  list(eval_lib.CHECKPOINTS),
  'Best-by-validation-accuracy or the last checkpoint.',
)
_METHODS = flags.DEFINE_list(
  'methods',
  [],
  f'CAM methods to measure, of {", ".join(explain.METHODS)} '
  '(cam needs a global-average-pool + dense head, e.g. resnet18; '
  'evidence a Soft-CAM head; raw_attention CA-Stream). Default: '
  "grad_cam, grad_cam_pp, score_cam and the model's own.",
)
_NUM_IMAGES = flags.DEFINE_integer(
  'num_images',
  _DEFAULTS.num_images,
  'Test images (the first ones) for the per-method metrics; '
  '0 = the whole test set. Accuracy and figures always use '
  'the whole test set.',
)
_TARGET = flags.DEFINE_enum(
  'target',
  _DEFAULTS.target,
  list(explain.TARGETS),
  'Class explained by each map: ground truth or prediction.',
)
_LAYER = flags.DEFINE_string(
  'layer',
  _DEFAULTS.layer,
  'Explained layer: a key of the backbone features dict (cam, stage3, ...) or a module '
  'path (backbone_net/stage3_block1/conv2); an unknown one lists the valid ones.',
)
_N_STEPS = flags.DEFINE_integer(
  'n_steps',
  _DEFAULTS.n_steps,
  'Insertion/deletion in this many equal steps (the previous convention: 25); 0 = '
  '--pixels_per_step pixels per step.',
)
_PIXELS_PER_STEP = flags.DEFINE_integer(
  'pixels_per_step',
  _DEFAULTS.pixels_per_step,
  "Insertion/deletion pixels per step; 0 = 8 * image side (CA-Stream's: 4 steps at 28 px).",
)
_BLUR_SIZE = flags.DEFINE_integer(
  'blur_size',
  _DEFAULTS.blur_size,
  "Side of RISE's blur kernel that insertion starts from (CA-Stream's 5, RISE's 11); "
  '0 = the previous Gaussian blur of sigma side/10.',
)
_BLUR_SIGMA = flags.DEFINE_float(
  'blur_sigma', _DEFAULTS.blur_sigma, "Sigma of RISE's blur kernel (CA-Stream's and RISE's 5)."
)
_DELETION_BASELINE = flags.DEFINE_enum(
  'deletion_baseline',
  _DEFAULTS.deletion_baseline,
  list(eval_lib.DELETION_BASELINES),
  "What deletion sets pixels to: mean = 0 in normalised space (CA-Stream's), black = 0 in "
  'pixel space (the previous convention).',
)
_BATCH_SIZE = flags.DEFINE_integer(
  'batch_size', _DEFAULTS.batch_size, 'Images per jitted call of a method.'
)
_SCORE_CAM_CHUNK = flags.DEFINE_integer(
  'score_cam_chunk',
  _DEFAULTS.score_cam_chunk,
  'Channels per Score-CAM forward pass (memory bound).',
)
_NUM_OVERLAYS = flags.DEFINE_integer(
  'num_overlays', _DEFAULTS.num_overlays, 'Test images shown in overlays.png.'
)
_OVERLAY_SELECTION = flags.DEFINE_enum(
  'overlay_selection',
  _DEFAULTS.overlay_selection,
  list(eval_lib.OVERLAY_SELECTIONS),
  'Which test images overlays.png shows: the first ones or the first misclassified ones.',
)
_ROAD = flags.DEFINE_bool(
  'road',
  _DEFAULTS.road,
  'Also measure ROAD (remove and debias: MoRF, LeRF, combined; 18 forward passes per image).',
)
_SANITY_IMAGES = flags.DEFINE_integer(
  'sanity_images',
  _DEFAULTS.sanity_images,
  'Test images of the parameter randomisation test of each method (its maps with the '
  "model's blocks re-initialised from the output down); 0 = no test.",
)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  quiet_library_logs()
  try:
    options = _options()
  except ValueError as error:  # two flags that contradict each other, or a bad value
    raise ConfigError(f'eval flags: {error}') from None
  eval_lib.evaluate_and_report(_CONFIG.value, _WORKDIR.value, options)


def _options() -> eval_lib.EvalOptions:
  return eval_lib.EvalOptions(
    checkpoint=_CHECKPOINT.value,
    methods=tuple(_METHODS.value),
    num_images=_NUM_IMAGES.value,
    target=_TARGET.value,
    layer=_LAYER.value,
    n_steps=_N_STEPS.value,
    pixels_per_step=_PIXELS_PER_STEP.value,
    blur_size=_BLUR_SIZE.value,
    blur_sigma=_BLUR_SIGMA.value,
    deletion_baseline=_DELETION_BASELINE.value,
    batch_size=_BATCH_SIZE.value,
    score_cam_chunk=_SCORE_CAM_CHUNK.value,
    num_overlays=_NUM_OVERLAYS.value,
    overlay_selection=_OVERLAY_SELECTION.value,
    road=_ROAD.value,
    sanity_images=_SANITY_IMAGES.value,
  )


def run():
  """The `bcam-eval` console script and the clone's `python eval.py`."""
  cli.run_command(main, __name__)
