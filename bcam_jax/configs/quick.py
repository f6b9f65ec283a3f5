"""A first run in about a minute on 2 CPU cores: SimpleCNN with the Batch-CAM Prototype Loss.

MNIST (downloaded on first use), 150 steps of batch 64, validation on 500 images and the test
on 1,000 of the 10,000 (`data.test_size`), so a newcomer sees the whole loop: training with
the explanation term, validation, test, checkpoints, then an explanation report from
`bcam-eval` on 200 test images with Grad-CAM and Grad-CAM++ (Score-CAM, slower, is left
out). It is a taste of the method, not a result: `configs/resnet18_bcpl.py` is the real job
(about 70 minutes on 2 CPU cores; bench/README.md).

Run:
  bcam-train --config=quick --workdir=runs/quick      # or python train.py --config=configs/quick.py
  bcam-eval --workdir=runs/quick                      # the report in runs/quick/eval/

Expected: test accuracy around 97% (results.json) with a Batch-CAM loss that falls from one
validation to the next. Measured on the project's 2-core CPU while another job shared it,
with the IDX files cached: train.py 72 s, eval.py 42 s, each including start-up and
compilation. The report's cam_prototypes.png shows each class's mean Grad-CAM beside its
prototype.
"""

from bcam_jax.configs import experiment


def get_config():
  config = experiment.get_config('model=simple_cnn,loss=bcpl')
  config.data.val_size = 500
  config.data.test_size = 1000
  config.train.batch_size = 64
  config.train.num_steps = 150
  config.train.log_every_steps = 25
  config.train.eval_every_steps = 75
  config.eval.batch_size = 500
  config.eval.methods = 'grad_cam,grad_cam_pp'
  config.eval.num_images = 200
  return config
