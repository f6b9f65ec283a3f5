"""Shared defaults of every bcam-jax configuration.

`configs/experiment.py` starts from `get_base_config()` and sets the model and the
condition. Any field can be overridden on the command line, e.g.
`python train.py --config=configs/experiment.py:model=simple_cnn
--config.data.name=fashion_mnist --config.data.image_size=112
--config.optimizer.learning_rate=0.05`.
"""

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  """Defaults: MNIST at 28x28, batch 128, SGD + momentum, warm-up + cosine schedule."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  # A zoo model (bcam_jax.models.MODEL_NAMES) or a linen model of your own by import path,
  # 'package.module:ClassName', built as ClassName(num_classes=..., **config.model.options)
  # and explained at config.model.cam_layer (a submodule path, e.g. 'conv3';
  # docs/guides/train-your-model.md).
  config.model.name = 'simple_cnn'
  config.model.cam_layer = ''
  # Model-specific keyword arguments of `bcam_jax.models.get_model` (e.g. `stem`).
  config.model.options = ml_collections.ConfigDict()
  config.model.head = 'default'  # 'default' | 'softcam' (class-evidence maps)
  config.model.pooling = 'default'  # 'default' | 'ca_stream' (attention pooling)
  # How convolutions lower: 'auto' (per call, from backend and shapes) | 'xla' | 'shifted_matmul'.
  # Speed only: parameters and checkpoints are the same (bcam_jax/models/conv.py).
  config.model.conv_lowering = 'auto'
  config.model.ca_stream = ml_collections.ConfigDict()
  # True: restore backbone and classifier from config.init_from, train only the stream.
  config.model.ca_stream.freeze_backbone = False
  # Workdir of a trained run (same model name and options, default head and pooling) whose
  # best checkpoint initialises the backbone and the classifier; '' starts from scratch.
  config.init_from = ''
  # Published weights to fine-tune (docs/guides/models.md): config.init.pretrained is a
  # state_dict file (.pth/.pt with torch, .safetensors) in torchvision's (ResNets) or timm's
  # (ViT, ConvNeXt) names, or a `bcam-weights convert` directory. The backbone (and a ViT's
  # last block and final norm) comes from it; the classifier starts fresh for the data's
  # classes; for 1-channel data the first conv is summed over RGB. freeze_backbone=True keeps
  # the backbone fixed (evaluation mode, no gradient) and trains what follows it: the
  # classifier, Soft-CAM's evidence conv or CA-Stream's stream and classifier. It needs
  # init.pretrained or init_from.
  config.init = ml_collections.ConfigDict()
  config.init.pretrained = ''
  config.init.freeze_backbone = False

  config.data = ml_collections.ConfigDict()
  # 'mnist' | 'fashion_mnist'; with source 'tfds' any TFDS image-classification dataset
  # (e.g. 'cifar10'); with source 'folder', a label of your own for logs and figures.
  config.data.name = 'mnist'
  # 'auto' | 'tfds' | 'idx' | 'download' (docs/guides/data.md) | 'folder' (data.folder_dir)
  config.data.source = 'auto'
  # source 'folder': the root of <root>/{train,val?,test}/<class>/*.{png,jpg,jpeg}.
  config.data.folder_dir = ''
  # source 'folder' or a TFDS dataset by name: 1 | 3, or 0 to take it from the data.
  config.data.channels = 0
  # The class prototypes the CAM losses compare with: 'luma' (grayscale of each class's mean
  # image) | 'channels' (mean of its per-channel min-max scaled means) | 'file'
  # (data.prototypes_file, a .npy of (num_classes, H, W) or (num_classes, C, H, W)).
  config.data.prototypes = 'luma'
  config.data.prototypes_file = ''
  # Which images: 'split' (train and val prototypes each from their own split) | 'pooled'
  # (one per class from train and val together, for both; Batch-CAM section 3.4's wording).
  config.data.prototypes_from = 'split'
  config.data.idx_dir = ''  # '' -> $BCAM_DATA_DIR/<name>
  config.data.tfds_data_dir = ''  # '' -> TFDS default (~/tensorflow_datasets)
  config.data.val_size = 5000  # taken from the official train split
  config.data.test_size = 0  # > 0: test on a seeded subset of that many test images
  config.data.split_seed = 0
  # Resized on device inside the jitted step; an image folder is resized (shorter side) and
  # centre-cropped to it when read.
  config.data.image_size = 28
  # Pixel normalisation: 'auto' (ImageNet's mean and std when config.init.pretrained is set,
  # as the published weights expect, else 'dataset') | 'dataset' (the literature constants
  # of MNIST and Fashion-MNIST, else the train split's per-channel mean and std) |
  # 'imagenet' (0.485, 0.456, 0.406 / 0.229, 0.224, 0.225; 1-channel data: their means).
  config.data.normalization = 'auto'
  # Large datasets and augmentation (docs/guides/data.md): a folder or a TFDS dataset by
  # name streams instead of being read into memory: 'auto' (when decoded larger than
  # in_memory_limit_mb) | 'stream' | 'memory'; decode_workers threads decode (0: one per
  # CPU, at most 16).
  config.data.stream = 'auto'
  config.data.in_memory_limit_mb = 2048.0
  config.data.decode_workers = 0
  # Train-time augmentation on device, keyed by (seed, step); off for the paper's configs.
  config.data.augment = ml_collections.ConfigDict()
  config.data.augment.random_resized_crop = False  # torchvision's RandomResizedCrop
  config.data.augment.scale = (0.08, 1.0)  # crop area / image area
  config.data.augment.ratio = (3 / 4, 4 / 3)  # crop width / height
  config.data.augment.horizontal_flip = False  # each image flipped with probability 1/2

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 128  # global batch, split over all devices
  config.train.num_epochs = 5
  config.train.num_steps = -1  # > 0 overrides num_epochs
  # Compute dtype: 'float32' | 'bfloat16' | 'float64' (a reference precision; JAX_ENABLE_X64=1).
  config.train.dtype = 'float32'
  config.train.log_every_steps = 50
  config.train.eval_every_steps = 0  # 0 -> once per epoch
  config.train.checkpoint_every_steps = 500
  config.train.keep_checkpoints = 3  # the latest K; the best one is kept separately

  # Validation and test passes, and what eval.py measures (`eval_options.EvalOptions`, whose
  # docstring says what each field means; `--config.eval.<field>=...` on the command line).
  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 500  # images per validation / test step
  config.eval.checkpoint = 'best'  # 'best' (by validation accuracy) | 'last'
  # Comma-separated names of explain.METHODS; '' = grad_cam, grad_cam_pp, score_cam and the
  # model's own (Soft-CAM's evidence, CA-Stream's raw_attention).
  config.eval.methods = ''
  config.eval.num_images = 1000  # test images for the per-method metrics; 0 = all
  config.eval.target = 'label'  # the class each map explains: 'label' | 'predicted'
  config.eval.layer = 'cam'  # a features key (cam, stage3, ...) or a module path
  # Insertion/deletion: pixels_per_step (0 = 8 * image side) or n_steps equal steps;
  # insertion from RISE's blur_size x blur_sigma blur (0 = a Gaussian of sigma side / 10);
  # deleted pixels become 'mean' (0 in normalised space) or 'black' (0 in pixel space).
  config.eval.n_steps = 0
  config.eval.pixels_per_step = 0
  config.eval.blur_size = 5
  config.eval.blur_sigma = 5.0
  config.eval.deletion_baseline = 'mean'
  config.eval.method_batch_size = 128  # images per jitted call of a method
  config.eval.score_cam_chunk = 16  # channels per Score-CAM forward pass (memory bound)
  config.eval.steps_per_call = 4  # insertion/deletion steps per forward pass
  config.eval.num_overlays = 6  # test images in overlays.png
  config.eval.overlay_selection = 'first'  # 'first' | 'misclassified'
  config.eval.num_error_pairs = 8  # confusions in error_prototypes.png
  config.eval.road = False  # also ROAD (18 forward passes per image)
  config.eval.sanity_images = 0  # images of the parameter randomisation test; 0 = none

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'sgd'  # 'sgd' | 'adamw'
  config.optimizer.learning_rate = 0.05
  config.optimizer.momentum = 0.9  # sgd momentum; adamw b1
  config.optimizer.nesterov = True
  config.optimizer.b2 = 0.999  # adamw only
  config.optimizer.weight_decay = 5e-4  # kernels only (not biases or norm scales)
  config.optimizer.schedule = 'warmup_cosine'  # 'constant' | 'cosine' | 'warmup_cosine'
  config.optimizer.warmup_steps = 100
  config.optimizer.grad_clip_norm = 0.0  # 0 disables clipping

  # lambda_class * CE + lambda_cam * CAM term (Batch-CAM eqs. 11-12).
  config.loss = ml_collections.ConfigDict()
  config.loss.kind = 'ce'  # 'ce' | 'proto' (per image) | 'bcpl' (Batch-CAM)
  config.loss.metric = 'l1'  # 'l1' | 'l2' | 'ssim'
  config.loss.lambda_class = 1.0
  config.loss.lambda_cam = 1.0
  # How the CAM term trains (docs/guides/batch-cam.md): 'full' differentiates it through the
  # features A and through Grad-CAM's G = dS_y/dA (second order through the head);
  # 'through_features' holds G constant, as the paper's torch.autograd.grad (create_graph
  # False) probably did. Grad-CAM only: Soft-CAM's evidence maps have no G.
  config.loss.cam_gradient = 'full'
  # Soft-CAM's ElasticNet on the evidence maps E (N, h, w, C): lambda_l1 sum|E| +
  # lambda_l2 sum E^2. 'sum' (the paper's): over each image's positions and classes, then the
  # batch mean, so the paper's lambdas (1e-5 to 1e-3) apply; 'mean': means over everything,
  # i.e. the 'sum' penalty / (h * w * C) (SimpleCNN at 28 px: / 490).
  config.loss.lambda_l1 = 0.0
  config.loss.lambda_l2 = 0.0
  config.loss.elastic_net_reduction = 'sum'  # 'sum' | 'mean'
  return config
