"""Defaults shared by every fine-tuning config (docs/method.md §6; [M3AE] = M3AE's task configs). Each
task file in this directory starts from `base(task, dataset)` and sets what differs; select it with
`mpma-finetune --config configs/finetune/<task>.py --init RUN --workdir DIR`.
"""
import ml_collections

from mpma_jax.configs import pretrain


def base(task: str, dataset: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = task  # vqa | classification | image_classification | retrieval
  c.dataset = dataset  # a name of `mpma-data list`, built with `mpma-data build`
  c.data_dir = ""  # the --data_dir given to `mpma-data build` (or --data_dir on the command line)
  # prior (M3AE-style: vocabulary from all splits, selection on test without a validation split)
  # and/or clean (train-only vocabulary, validation carved out of train); data/downstream.py.
  c.protocols = ("prior", "clean")
  c.seed = 0  # head initialisation, shuffling, dropout, the carved validation split
  c.image_size = 384  # fine-tuning resolution [M3AE]; 0 = the pre-training size
  c.model_dtype = ""  # "" = the pre-training run's model.dtype; or float32 | bfloat16
  c.remat = ""  # "" = the pre-training run's model.remat
  c.linear_probe = False  # image_classification: train only the linear head on frozen features
  # [choice] initial output biases of a VQA head (tasks.py): prior = log-odds of 1/C, so that the
  # first steps of binary cross-entropy over C answers do not go into pushing C - 1 sigmoids from
  # 1/2 towards 0; zero = M3AE's (its init_weights zeroes every Linear bias). Other heads: zero.
  c.head_output_bias = "prior"

  c.data = ml_collections.ConfigDict()
  c.data.max_len = 32  # question / caption tokens [M3AE: 32 for VQA]
  c.data.test_split = ""  # "" = test if the dataset has one, else validation
  c.data.val_fraction = 0.1  # clean protocol without a validation split: images carved from train
  c.data.label_fraction = 1.0  # share of the training records used (1%, 10%, 100% experiments)
  c.data.labels = ()  # image_classification: the classes scored (names of the dataset's classes)
  c.data.uncertain = "ones"  # image_classification label -1: ones | zeros | ignore (not trained)
  c.data.blank = "zeros"  # image_classification empty label: zeros | ignore
  c.data.workers = 0  # Grain worker processes (0 = in the main process)
  c.data.read_threads = 8  # threads decoding examples
  c.data.read_buffer = 64  # examples read ahead

  c.optim = ml_collections.ConfigDict()  # AdamW, linear warm-up then linear decay [M3AE]
  c.optim.lr = 5e-6  # the encoders' learning rate
  c.optim.fusion_mult = 5.0  # x lr for the rest of the pre-trained model (fusion, memory, ...)
  c.optim.head_mult = 50.0  # x lr for the new task head
  c.optim.encoder_modules = ("image_encoder", "text_encoder", "modality_type")
  c.optim.warmup = 0.1  # fraction of the steps
  c.optim.b1 = 0.9
  c.optim.b2 = 0.98
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.01
  c.optim.grad_clip = 0.0  # global-norm clipping; 0 disables

  c.train = ml_collections.ConfigDict()
  c.train.epochs = 10
  c.train.batch_size = 32  # global batch
  c.train.log_every = 20  # steps between loss lines in metrics.jsonl / TensorBoard
  # A step whose loss, new parameters or optimizer state is not finite changes nothing; then: skip
  # (count it, up to the limits below, checked after each epoch) | stop (raise after the epoch).
  c.train.nonfinite = "skip"
  c.train.max_nonfinite_consecutive = 20  # skip: stop after more in a row; 0 = no limit
  c.train.max_nonfinite_total = 100  # skip: stop after more in the protocol's run; 0 = no limit

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 64  # validation / test batch (must split over the devices)

  # Device mesh and logical -> mesh axis rules: the same fields as pre-training's.
  c.mesh = ml_collections.ConfigDict(pretrain.get_config("base").mesh.to_dict())
  return c
