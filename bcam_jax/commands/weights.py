"""Converts published weights for machines without torch:

  bcam-weights convert NAME IN OUT [--num_classes=N]

(or `python -m bcam_jax.commands.weights convert ...`). IN is a PyTorch state_dict (`.pth`,
`.pt`; needs torch) or a `.safetensors` file with torchvision's or timm's names for model
NAME (resnet18/34/50/101, vit_s16, vit_b16, convnext_tiny; see
`bcam_jax.models.pretrained`). OUT, a new directory, receives the model variables as an Orbax
checkpoint and a model.json (name, num_classes, options, image size, channels), written
atomically; `bcam_jax.models.pretrained.load_converted(OUT)` reads them back without torch.
--num_classes other than the file's starts a fresh classifier.
"""

from absl import app, flags

from bcam_jax import cli
from bcam_jax.models import pretrained

_NUM_CLASSES = flags.DEFINE_integer(
  'num_classes', None, "Classes of the converted model; default the file's classifier size."
)


def main(argv):
  if len(argv) != 5 or argv[1] != 'convert':
    raise app.UsageError(f'Expected `convert NAME IN OUT`, got {argv[1:]}.')
  name, source, out = argv[2:]
  info = pretrained.convert(name, source, out, num_classes=_NUM_CLASSES.value)
  print(
    f'{name}: {info["num_classes"]} classes, {info["image_size"]}x{info["image_size"]}x'
    f'{info["channels"]} images, written to {out}'
  )


def run():
  """The `bcam-weights` console script and `python -m bcam_jax.commands.weights`."""
  cli.run_command(main, __name__)


if __name__ == '__main__':
  run()
