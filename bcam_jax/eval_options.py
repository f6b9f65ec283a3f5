"""What an evaluation measures: `EvalOptions`, built from `config.eval` (`from_config`) or
by hand, read by `eval_lib.evaluate_and_report` and the grids' evaluations.

`config.eval` of `configs/base.py` is the one place of the command line's settings (`bcam-eval
--config.eval.methods=grad_cam,score_cam --config.eval.road=True`); its defaults equal this
dataclass's (tests/test_eval.py checks it).
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from bcam_jax import explain
from bcam_jax.explain import faithfulness
from bcam_jax.train_state import CHECKPOINTS

OVERLAY_SELECTIONS = ('first', 'misclassified')
DELETION_BASELINES = ('mean', 'black')
# The EvalOptions fields of the insertion/deletion convention.
INSERTION_DELETION_FIELDS = (
  'n_steps',
  'pixels_per_step',
  'blur_size',
  'blur_sigma',
  'deletion_baseline',
)


@dataclasses.dataclass(frozen=True)
class EvalOptions:
  """What `evaluate_and_report` measures.

  Insertion and deletion (`faithfulness.insertion_deletion`) follow CA-Stream's convention
  by default; the equal-steps convention of this project's tables in results/ is
  `n_steps=25, blur_size=0, deletion_baseline='black'`.

  Attributes:
    checkpoint: which checkpoint of the workdir, 'best' or 'last'.
    methods: CAM methods (`explain.METHODS`); empty for `explain.default_methods` of the
      model (the post-hoc ones plus Soft-CAM's evidence or CA-Stream's raw attention).
    num_images: test images (the first ones) for the per-method metrics, 0 for all.
    target: the class each map explains, 'label' or 'predicted'.
    layer: the explained layer of the features dict.
    n_steps: insertion / deletion in n_steps > 0 equal steps instead of `pixels_per_step`.
    pixels_per_step: pixels per insertion / deletion step, 0 for 8 * side (CA-Stream's).
    blur_size: insertion starts from RISE's blur (`faithfulness.rise_blur`) of a blur_size x
      blur_sigma kernel (CA-Stream's 5 x 5; RISE's own 11 x 5); 0 for a Gaussian of sigma
      side / 10 (`faithfulness.blur`).
    blur_sigma: that kernel's sigma.
    deletion_baseline: what deleted pixels (and the RISE blur's padding) become, 'mean' (0
      in normalised space, the dataset mean in pixels) or 'black' (0 in pixel space).
    method_batch_size: images per jitted call of a method (Score-CAM and insertion /
      deletion multiply it by score_cam_chunk and 2 * steps_per_call).
    score_cam_chunk: Score-CAM's channels per masked forward pass.
    steps_per_call: insertion / deletion steps per call of the model.
    num_overlays: test images in overlays.png.
    overlay_selection: which ones, the 'first' of the test split (the classes in turn) or
      its first 'misclassified' ones (where the maps show what misled the model).
    num_error_pairs: confusions in error_prototypes.png.
    road: also ROAD (MoRF, LeRF and combined over percentiles 10-90, `faithfulness.road`, 18
      forward passes per image; its imputation noise from a fixed key, so a result is
      reproducible).
    sanity_images: the first test images of the parameter randomisation test
      (`explain.sanity`, each method's maps with the model's blocks re-initialised from the
      output down, one stage per block), 0 for none.
  """

  checkpoint: str = 'best'
  methods: tuple[str, ...] = ()
  num_images: int = 1000
  target: str = 'label'
  layer: str = 'cam'
  n_steps: int = 0
  pixels_per_step: int = 0
  blur_size: int = 5
  blur_sigma: float = 5.0
  deletion_baseline: str = 'mean'
  method_batch_size: int = 128
  score_cam_chunk: int = 16
  steps_per_call: int = 4
  num_overlays: int = 6
  overlay_selection: str = 'first'
  num_error_pairs: int = 8
  road: bool = False
  sanity_images: int = 0

  def __post_init__(self):
    if self.checkpoint not in CHECKPOINTS:
      raise ValueError(f'checkpoint={self.checkpoint!r}; valid: {CHECKPOINTS}')
    if self.methods:
      explain.check_methods(self.methods)
    if self.overlay_selection not in OVERLAY_SELECTIONS:
      raise ValueError(f'overlay_selection={self.overlay_selection!r}; valid: {OVERLAY_SELECTIONS}')
    if self.target not in explain.TARGETS:
      raise ValueError(f'target={self.target!r}; valid: {explain.TARGETS}')
    for name in ('method_batch_size', 'score_cam_chunk', 'steps_per_call'):
      if getattr(self, name) < 1:
        raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}')
    for name in (
      'num_images',
      'num_overlays',
      'num_error_pairs',
      'sanity_images',
      'n_steps',
      'pixels_per_step',
      'blur_size',
    ):
      if getattr(self, name) < 0:
        raise ValueError(f'{name} must be >= 0, got {getattr(self, name)}')
    if self.n_steps and self.pixels_per_step:
      raise ValueError(
        f'n_steps={self.n_steps} and pixels_per_step={self.pixels_per_step}: give one (equal '
        'steps, or pixels per step), the other 0.'
      )
    if self.blur_size % 2 == 0 and self.blur_size:
      raise ValueError(
        f'blur_size={self.blur_size}; expected an odd kernel side, or 0 for the Gaussian of '
        'sigma side / 10.'
      )
    if not self.blur_sigma > 0:
      raise ValueError(f'blur_sigma={self.blur_sigma}; expected > 0.')
    if self.deletion_baseline not in DELETION_BASELINES:
      raise ValueError(f'deletion_baseline={self.deletion_baseline!r}; valid: {DELETION_BASELINES}')

  @classmethod
  def from_config(cls, config_eval: Mapping[str, Any], **overrides) -> 'EvalOptions':
    """The options that `config_eval` (`config.eval`, or a grid's `eval`) sets, the others at
    their defaults, then `overrides`. `methods` may be a comma-separated string (as the
    command line gives it: `--config.eval.methods=grad_cam,score_cam`); fields of
    `config.eval` that are not options (`batch_size`, the test pass's) are left alone.

    Raises ValueError naming the `config.eval` field of a bad value.
    """
    values = {f.name: config_eval[f.name] for f in dataclasses.fields(cls) if f.name in config_eval}
    values |= overrides
    if isinstance(values.get('methods'), str):
      values['methods'] = tuple(m.strip() for m in values['methods'].split(',') if m.strip())
    elif 'methods' in values:
      values['methods'] = tuple(values['methods'])
    try:
      return cls(**values)
    except ValueError as error:
      raise ValueError(f'config.eval: {error}') from None

  def insertion_deletion_steps(self, image_size: int) -> np.ndarray:
    """Pixels changed after each insertion/deletion step at `image_size`, `(S + 1,)`."""
    return faithfulness.step_counts(image_size, image_size, self.n_steps, self.pixels_per_step)

  def insertion_deletion_convention(self, image_size: int) -> str:
    """The insertion/deletion convention in words, for the reports that print the numbers,
    e.g. "insertion from RISE's 5x5 blur of sigma 5, deletion to 0 in normalised space (the
    dataset mean), 4 steps of 224 pixels (CA-Stream's convention)"."""
    counts = self.insertion_deletion_steps(image_size)
    if self.blur_size:
      blur = f"RISE's {self.blur_size}x{self.blur_size} blur of sigma {self.blur_sigma:g}"
    else:
      blur = f'a Gaussian blur of sigma side/10 ({image_size / 10:g} px)'
    baseline = {
      'mean': '0 in normalised space (the dataset mean)',
      'black': 'black (0 in pixel space)',
    }[self.deletion_baseline]
    steps = len(counts) - 1
    rule = f'{steps} equal steps' if self.n_steps else f'{steps} steps of {int(counts[1])} pixels'
    ca_stream = (self.blur_size, self.blur_sigma, self.deletion_baseline) == (5, 5.0, 'mean')
    ca_stream = ca_stream and not self.n_steps and self.pixels_per_step in (0, 8 * image_size)
    return f'insertion from {blur}, deletion to {baseline}, {rule}' + (
      " (CA-Stream's convention)" if ca_stream else ''
    )
