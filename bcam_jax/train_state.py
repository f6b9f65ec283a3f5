"""Where a run's parameters come from: its initial train state, the abstract layout a restore
fills, and every restore (the latest train state, the best or last model variables, a
baseline's backbone and classifier). `StateSpec` holds what they are built from; it takes no
config."""

import dataclasses
from typing import Any

import jax
from absl import logging
from flax import traverse_util

from bcam_jax import parallel, steps
from bcam_jax.checkpointing import Checkpoints, require_checkpoint
from bcam_jax.config_validation import ConfigError
from bcam_jax.models.base import is_stream_param
from bcam_jax.models.pretrained import WeightsError, pretrained_variables

CHECKPOINTS = ('best', 'last')


@dataclasses.dataclass(frozen=True)
class StateSpec:
  """A train state's makings: the model, the seed of its initialisers, the image side and
  channel count its first layers are built for, and the mesh the state is replicated on."""

  model: Any
  seed: int
  image_size: int
  channels: int
  mesh: jax.sharding.Mesh

  def initial(self, tx) -> steps.TrainState:
    """The initial train state with optimiser `tx`, replicated over the mesh."""
    init = steps.make_init_fn(self.model, tx, self.seed, self.image_size, self.channels)
    return jax.jit(init, out_shardings=parallel.replicated(self.mesh))()

  def abstract(self, tx) -> steps.TrainState:
    """Shapes, dtypes and shardings of the train state, without computing it: the target
    layout of a checkpoint restore."""
    return self._replicated_shapes(lambda: self.initial(tx))

  def abstract_variables(self, model=None) -> dict:
    """Shapes, dtypes and shardings of the variables of `model` (default: this spec's): the
    target layout of a restore that needs no optimiser."""
    return self._replicated_shapes(
      steps.make_variables_fn(model or self.model, self.seed, self.image_size, self.channels)
    )

  def restore_variables(self, workdir: str, checkpoint: str = 'best') -> tuple[dict, int]:
    """(model variables, step) of the `best` (by validation accuracy) or `last` checkpoint
    of `workdir`, without building an optimiser."""
    if checkpoint not in CHECKPOINTS:
      raise ValueError(f'checkpoint={checkpoint!r}; valid: {CHECKPOINTS}')
    require_checkpoint(workdir, checkpoint)
    ckpts = Checkpoints(workdir)
    try:
      if checkpoint == 'best':
        return ckpts.restore_best(self.abstract_variables())
      return ckpts.restore_latest_variables(self.abstract_variables())
    finally:
      ckpts.close()

  def restore_or_init(
    self, ckpts: Checkpoints, tx, baseline=None, pretrained=None
  ) -> tuple[Any, bool]:
    """(train state, resumed): the latest checkpoint of `ckpts`, else a new state, with the
    backbone and classifier of `baseline` = (its model, its workdir) when given, or the
    published weights of `pretrained` = (model name, weights path)."""
    state = ckpts.restore_latest(self.abstract(tx))
    if state is not None:
      return state, True
    state = self.initial(tx)
    if baseline is not None:
      state = self.from_baseline(state, *baseline)
    if pretrained is not None:
      state = self.from_pretrained(state, *pretrained)
    return state, False

  def from_pretrained(self, state: steps.TrainState, name: str, path: str) -> steps.TrainState:
    """`state` with the published weights at `path` for model `name` in its backbone (and
    the head variables they have); the classifier, evidence conv and stream keep their
    initial values (`models.pretrained.pretrained_variables`)."""
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    try:
      loaded, notes = pretrained_variables(name, self.model, path, variables)
    except WeightsError as error:
      raise ConfigError(f'config.init.pretrained: {error}') from None
    sharding = parallel.replicated(self.mesh)
    # Every process reads the file; each fills its own devices' replicas of each array.
    loaded = jax.tree.map(
      lambda v: (
        v
        if isinstance(v, jax.Array)
        else jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
      ),
      loaded,
    )
    logging.info('Initialised from the weights in %s; %s.', path, '; '.join(notes) or 'all of them')
    return state.replace(params=loaded['params'], batch_stats=loaded.get('batch_stats', {}))

  def from_baseline(self, state: steps.TrainState, model, workdir: str) -> steps.TrainState:
    """`state` with the backbone, classifier and BatchNorm statistics of the best
    checkpoint of `workdir`, a run of `model` (this one's architecture with the default
    head and pooling); CA-Stream's parameters keep their initial values."""
    ckpts = Checkpoints(workdir)
    try:
      restored, step = ckpts.restore_best(self.abstract_variables(model))
    finally:
      ckpts.close()
    # By key path: W_L, part of the stream, lives in the head beside the restored classifier.
    params = traverse_util.flatten_dict(state.params)
    baseline_params = traverse_util.flatten_dict(restored['params'])
    for name in ('backbone_net', 'head_net'):
      want = {p: v.shape for p, v in params.items() if p[0] == name and not is_stream_param(p)}
      got = {p: v.shape for p, v in baseline_params.items() if p[0] == name}
      if want != got:
        raise ConfigError(
          f'config.init_from={workdir!r}: its {name} parameters do not fit this model '
          f"({self.model.label()}, {self.model.kind}); e.g. simple_cnn's flatten + dense "
          'classifier cannot take pooled features.'
        )
    params = traverse_util.unflatten_dict(params | baseline_params)
    logging.info(
      'Initialised backbone and classifier from %s (best checkpoint, step %d).', workdir, step
    )
    return state.replace(params=params, batch_stats=restored.get('batch_stats', {}))

  def _replicated_shapes(self, fn):
    """ShapeDtypeStructs, replicated over the mesh, of what `fn()` would return."""
    sharding = parallel.replicated(self.mesh)
    return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), jax.eval_shape(fn)
    )
