"""MPMA pre-training configs. Select a variant with `--config configs/pretrain.py:<variant>`.

  tiny  a few-minute CPU run on the built-in synthetic dataset (the README's main job)
  small a larger synthetic run, still CPU-friendly (benchmarks, sanity sweeps)
  base  the paper's sizes: ViT-B/16 at 288, RoBERTa-base, 6 fusion layers, batch 256, 100k steps
  m3ae       base as M3AE pre-trains it (M3AE below): the baseline MPMA is measured against
  m3ae_tiny  tiny with M3AE's objective and heads (its encoders keep tiny's depth)

Override any field on the command line, e.g. `--config.train.steps=200 --config.model.memory.topk=16`.
Fields marked [choice] are the project's own choices where the paper is silent (docs/method.md).
"""
import ml_collections

from mpma_jax.sweep import chain, fixed, product, sweep


def model_config() -> ml_collections.ConfigDict:
  """Base-size model (docs/method.md §1-4)."""
  m = ml_collections.ConfigDict()
  m.dtype = "float32"  # compute dtype: float32 | bfloat16 (params and losses stay float32)
  # Rematerialisation of every transformer block: none | full (recompute all) | dots (keep matmul
  # outputs) | dots_no_batch (keep weight matmuls only). Trades backward-pass compute for memory.
  m.remat = "none"
  # Run the encoders', the fusion's and the MIM decoder's layers with nn.scan: one compiled layer
  # per stack instead of one per layer, so compile time does not grow with depth (docs/scaling.md).
  # Same function (tested); parameters stacked [layers, ...] (models.mpma.scanned_params converts;
  # import/export go through the unrolled layout). Off by default: the unrolled step runs a little
  # faster on CPU and drops the fusion's unused last image layer.
  m.scan = False
  m.hidden = 768  # fusion width d (projections, memory, co-attention, poolers)

  m.image = ml_collections.ConfigDict()
  m.image.size = 288  # pre-training resolution; 18x18 = 324 patches + CLS
  m.image.patch = 16
  m.image.width = 768
  m.image.layers = 12  # [choice] CLIP ViT-B/16's 12 blocks; M3AE keeps the first 11
  m.image.heads = 12
  m.image.mlp_ratio = 4.0
  # [choice] resize of the position table when the patch grid changes (checkpoint import,
  # fine-tuning at another size): torch_bicubic (PyTorch's bicubic, a = -0.75, align_corners=False,
  # as M3AE resizes, so imported M3AE / CLIP tables match theirs) | jax_bicubic (jax.image.resize:
  # a = -0.5, antialiased when shrinking)
  m.image.pos_resize = "torch_bicubic"

  m.text = ml_collections.ConfigDict()
  m.text.vocab_size = 50265  # must be >= the tokenizer's size (RoBERTa-base: 50,265)
  m.text.width = 768
  m.text.layers = 12
  m.text.heads = 12
  m.text.mlp_dim = 3072
  m.text.max_positions = 514  # position-embedding rows (RoBERTa: max length + pad_id + 1)
  m.text.type_vocab_size = 1  # RoBERTa has 1 token type, BERT 2
  m.text.pad_id = 1  # must equal the tokenizer's pad token id
  m.text.position_style = "roberta"  # bert (0..L-1) | roberta (pad_id+1.., padding at pad_id)
  m.text.eps = 1e-5  # LayerNorm epsilon (BERT 1e-12, RoBERTa 1e-5)
  m.text.dropout = 0.1
  m.text.attn_dropout = 0.1

  m.fusion = ml_collections.ConfigDict()
  m.fusion.layers = 6  # K co-attention layers per stream
  m.fusion.heads = 12
  m.fusion.mlp_dim = 3072
  m.fusion.dropout = 0.1
  m.fusion.attn_dropout = 0.1

  m.memory = ml_collections.ConfigDict()  # MA-CMF [choice: R2GenCMN-style top-k memory]
  m.memory.enabled = True  # False = plain M3AE fusion
  m.memory.slots = 2048  # S
  m.memory.topk = 32  # slots read per token and head
  m.memory.heads = 8
  m.memory.placement = "pre_fusion"  # pre_fusion | every_text_layer
  m.memory.impl = "masked"  # masked (dense softmax over top-k) | gather (same result)

  m.gla = ml_collections.ConfigDict()  # global + local alignment [choice]
  m.gla.dim = 256  # alignment embedding width
  m.gla.local = "filip"  # filip (late interaction) | attention (GLoRIA-style)
  m.gla.features_from = "clean"  # clean (second unmasked encoder pass) | masked (reuse, cheaper)
  m.gla.temperature_init = 0.07
  # Floor of both temperatures: the value is clamped, the gradient passes through unchanged (as
  # CLIP clamps its logit scale), so a clamped temperature can rise again.
  m.gla.temperature_min = 0.01
  m.gla.attention_temp = 4.0  # GLoRIA word->patch attention sharpness (local = attention)
  m.gla.agg_temp = 5.0  # GLoRIA log-sum-exp over words (local = attention)
  m.gla.chunk = 8  # images per step of the local-similarity loop (memory vs speed)

  m.mim = ml_collections.ConfigDict()
  m.mim.layer = 3  # k_mim: fusion layer whose image stream feeds the decoder (1-based)
  m.mim.width = 384
  m.mim.depth = 4
  m.mim.heads = 6
  # [choice] decoder blocks: MAE's (gelu, eps 1e-6; the decoder MPMA's MIM is modelled on) or
  # M3AE's CLIP blocks (quick_gelu, eps 1e-5; init.m3ae with adapt_config sets those)
  m.mim.activation = "gelu"  # decoder MLP: gelu | quick_gelu
  m.mim.eps = 1e-6  # decoder LayerNorm epsilon
  m.mim.norm_pix = True  # per-patch normalised pixel targets
  # [choice] norm_pix divides by sqrt(var + 1e-6) with var over the p*p*3 values of a patch:
  # False = population variance (/n), the plain standardisation (and what mpma-visualize inverts);
  # True = sample variance (/(n-1)), as MAE's and M3AE's torch.var. They differ by a factor
  # sqrt(768/767) ~ 1.0007 on 16-px patches.
  m.mim.target_var_unbiased = False

  m.mlm = ml_collections.ConfigDict()  # MLM head: dense + GELU + LayerNorm + vocab projection
  # [choice] LayerNorm epsilon of the head: 1e-5 is RoBERTa-base's, so an imported RoBERTa LM head
  # computes what it was trained to; M3AE's BERT-style head uses 1e-12. adapt_config sets it to
  # the checkpoint's when init.text_mlm_head imports a head or init.m3ae has one.
  m.mlm.eps = 1e-5
  return m


# What M3AE does differently from MPMA's `base` (docs/method.md §7), as {dotted field: value}: the
# m3ae variants apply it; configs/ablations.py runs it as one arm of the ablation study. Its masking
# ratios (image 0.75, text 0.15, 80/10/10) are base's already; M3AE masks whole words, which the
# input pipeline does not (it masks tokens).
M3AE = {
    "masking.paired": False,  # two fused passes: MLM with the full image, MIM with the full text
    "model.memory.enabled": False,  # plain co-attention fusion, no MA-CMF
    "loss.global_": 0.0,  # no GLA
    "loss.local": 0.0,
    "loss.itm": 1.0,  # M3AE pre-trains with MLM + MIM + ITM
    "model.mim.activation": "quick_gelu",  # its MIM decoder's blocks are CLIP blocks
    "model.mim.eps": 1e-5,
    "model.mim.target_var_unbiased": True,  # torch.var: the sample variance
    "model.mlm.eps": 1e-12,  # its BERT-style MLM head
    "init.text_mlm_head": False,  # its MLM head starts fresh, not from the text checkpoint's
}
# M3AE's ViT depth at base size: its CLIP wrapper builds 11 of ViT-B/16's 12 blocks. The tiny
# encoders have no such checkpoint, so m3ae_tiny keeps tiny's depth.
M3AE_IMAGE_LAYERS = 11


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.variant = variant
  # Layout of this config as saved in a run's config.json; checkpoint.run_config brings configs of
  # older formats up to date (checkpoint.CONFIG_FORMAT).
  c.format_version = 3
  c.seed = 0
  c.model = model_config()

  # Start from public PyTorch weights (local paths; README "PyTorch interop"). Applied in the order
  # m3ae, image, text to a fresh model; parts not in a checkpoint keep their initialisation, and
  # <workdir>/init_report.txt lists every imported, skipped and newly initialised tensor.
  c.init = ml_collections.ConfigDict()
  c.init.m3ae = ""  # M3AE Lightning .ckpt: encoders, fusion, poolers, MIM/MLM/ITM heads
  c.init.image = ""  # Hugging Face CLIPVisionModel / CLIPModel directory (or weight file)
  c.init.text = ""  # Hugging Face RoBERTa / BERT directory (+ its MLM head when present)
  # [choice] import init.text's LM head (RobertaForMaskedLM / BertForMaskedLM) into the MLM head:
  # True starts MLM from the head trained with that encoder, so its loss starts low; False starts
  # it fresh, as M3AE does.
  c.init.text_mlm_head = True
  # Take model.image / model.text sizes from the checkpoints' config.json (not image.size: the
  # position embedding is resized; a smaller model.image.layers is kept, the first blocks are
  # imported), and the tokenizer from init.text when data.tokenizer=builtin.
  c.init.adapt_config = True

  c.masking = ml_collections.ConfigDict()  # paired masking, produced by the input pipeline
  # True: MPMA's paired masking, one fused pass with image and text both masked. False: M3AE's
  # objective, two fused passes (MLM with the full image, MIM with the full text; GLA and ITM on
  # the unmasked features), for the M3AE baseline (docs/method.md §7).
  c.masking.paired = True
  c.masking.image_ratio = 0.75  # MAE ratio; static keep count
  c.masking.text_ratio = 0.15  # share of real words chosen for MLM
  c.masking.mask_prob = 0.8  # chosen -> [MASK]
  c.masking.random_prob = 0.1  # chosen -> random token (the rest stay unchanged)

  c.loss = ml_collections.ConfigDict()  # total = sum of weight * loss
  c.loss.mlm = 1.0
  c.loss.mim = 1.0
  c.loss.global_ = 1.0  # GLA global InfoNCE ('global' is a Python keyword)
  c.loss.local = 1.0  # GLA local InfoNCE
  c.loss.itm = 0.0  # image-text matching (0 disables the ITM head and its fusion pass)

  c.data = ml_collections.ConfigDict()
  # One dataset or a weighted mixture, e.g. "roco", "roco:2,medicat:1,mimic_cxr:1" (names as in
  # `mpma-data build`); "synthetic" is the built-in generated set.
  c.data.name = "synthetic"
  c.data.data_dir = ""  # where `mpma-data build` wrote the datasets ("" = <workdir>/data, synthetic only)
  c.data.text_choice = "random"  # [choice] image with several texts: random | first | concat
  c.data.num_train = 50_000  # synthetic set: training pairs
  c.data.num_eval = 1_000  # synthetic set: validation and test pairs
  c.data.tokenizer = "builtin"  # builtin (WordPiece trained on the training texts) | a local HF dir
  c.data.tokenizer_vocab = 50265  # target vocab size when training the builtin tokenizer
  c.data.max_len = 64  # text length (pre-training)
  c.data.workers = 0  # Grain worker processes (0 = in the main process)
  c.data.prefetch = 2  # batches buffered per worker
  c.data.read_threads = 16  # threads per process decoding examples (PIL releases the GIL); 0 = none
  c.data.read_buffer = 256  # examples read ahead per process

  c.optim = ml_collections.ConfigDict()  # AdamW with M3AE's parameter groups (docs/method.md §5)
  c.optim.lr = 1e-5  # encoders' learning rate
  c.optim.lr_mult = 5.0  # multiplier for every module that is not an encoder
  c.optim.encoder_modules = ("image_encoder", "text_encoder", "modality_type")  # run at optim.lr
  c.optim.b1 = 0.9
  c.optim.b2 = 0.98
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.01  # not applied to biases and norms
  c.optim.warmup = 0.1  # fraction of steps of linear warm-up, then linear decay to 0
  c.optim.grad_clip = 0.0  # global-norm clipping; 0 disables

  c.train = ml_collections.ConfigDict()
  c.train.steps = 100_000
  c.train.batch_size = 256  # global batch
  c.train.log_every = 100  # console + TensorBoard scalars
  c.train.grad_accum = 1  # micro-batches per step (contrastive negatives: the global micro-batch)
  c.train.ckpt_every = 5000  # Orbax checkpoint interval (one is always written at the end)
  c.train.keep_checkpoints = 3
  c.train.ckpt_async = True  # write checkpoints in the background while training goes on
  # --resume with a damaged latest checkpoint (its arrays no longer match their checksums, or it
  # cannot be read): True = set it aside with a warning and resume from the one before; False = stop
  c.train.ckpt_fallback = True
  # A step whose loss, gradient, new parameters or new optimizer state is not finite never changes
  # the state (and no checkpoint is ever written from a non-finite one); then: skip (count it and
  # go on, up to the limits below) | stop (raise, keeping the last good checkpoint).
  c.train.nonfinite = "skip"
  c.train.max_nonfinite_consecutive = 20  # skip: stop after more in a row; 0 = no limit
  c.train.max_nonfinite_total = 1000  # skip: stop after more since the process started; 0 = none
  c.train.run_steps = 0  # stop (with a checkpoint) after this many steps in one invocation; 0 = off
  c.train.peak_tflops = 0.0  # peak TFLOP/s per device for MFU; 0 = from flops.PEAK_TFLOPS

  # Device mesh (data, fsdp, tensor); one size may be -1 = all remaining devices. The batch is split
  # over data x fsdp; parameters and optimizer state over fsdp ('embed') and tensor (heads, mlp).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  # logical axis -> mesh axes; parameters and activations carry the logical names.
  c.mesh.rules = (
      ("batch", ("fsdp", "data")),  # fsdp-major: ("data", "fsdp") trips an XLA bug (sharding.py)
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("vocab", "tensor"),
      ("slots", None),
      ("length", None),
      ("kv", None),
      ("patch", None),
      ("gla", None),
      ("classes", None),
      ("layers", None),  # the stacked-blocks axis of model.scan
  )

  c.eval = ml_collections.ConfigDict()  # zero-shot retrieval at the end of training
  c.eval.num_pairs = 1000  # held-out (image, report) pairs ranked all-against-all
  c.eval.batch_size = 256
  c.eval.pictures = True  # PNGs + TensorBoard images at the end (mpma-visualize, README Pictures)

  if variant in ("tiny", "m3ae_tiny"):
    _tiny(c)
  elif variant == "small":
    _tiny(c)
    _small(c)
  elif variant not in ("base", "m3ae"):
    raise ValueError(f"unknown variant {variant!r}: expected tiny, small, base, m3ae or m3ae_tiny")
  if variant.startswith("m3ae"):
    c.update_from_flattened_dict(M3AE)
  if variant == "m3ae":
    c.model.image.layers = M3AE_IMAGE_LAYERS
  return c


def _tiny(c):
  m = c.model
  m.hidden = 128
  m.image.update(size=64, patch=8, width=128, layers=3, heads=4)
  m.text.update(vocab_size=256, width=128, layers=3, heads=4, mlp_dim=512, max_positions=64,
                type_vocab_size=2, pad_id=0, position_style="bert", eps=1e-12, dropout=0.0,
                attn_dropout=0.0)
  m.mlm.eps = 1e-12  # BERT-style, like the tiny text encoder
  m.fusion.update(layers=2, heads=4, mlp_dim=512, dropout=0.0, attn_dropout=0.0)
  m.memory.update(slots=256, topk=16, heads=4)
  m.gla.dim = 64
  m.mim.update(layer=1, width=64, depth=1, heads=4)
  c.data.tokenizer_vocab = 256
  c.data.max_len = 40
  c.data.num_train = 20_000
  c.optim.lr = 5e-4
  c.optim.lr_mult = 2.5
  c.train.update(steps=500, batch_size=32, log_every=50, ckpt_every=250)
  c.eval.update(num_pairs=500, batch_size=250)


def _small(c):
  m = c.model
  m.hidden = 256
  m.image.update(size=96, patch=16, width=256, layers=4, heads=8)
  m.text.update(width=256, layers=4, heads=8, mlp_dim=1024)
  m.fusion.update(layers=2, heads=8, mlp_dim=1024)
  m.memory.update(slots=512, topk=32, heads=8)
  m.gla.dim = 128
  m.mim.update(layer=2, width=128, depth=2, heads=4)
  c.train.update(steps=3000, batch_size=64)


def get_sweep(variant: str = "tiny") -> list:
  """`mpma-sweep --config configs/pretrain.py:<variant> --workdir ROOT`: the encoders' learning rate
  (x0.5, x1, x2 of the variant's) crossed with the memory's top-k (x0.5, x1, x2), then two ablations
  at the defaults: plain M3AE fusion (no memory) and GLA on the masked pass. 11 runs."""
  c = get_config(variant)
  lr, topk = c.optim.lr, c.model.memory.topk
  return chain(
      product(sweep("optim.lr", [lr * 0.5, lr, lr * 2]),
              sweep("model.memory.topk", [topk // 2, topk, topk * 2])),
      fixed("model.memory.enabled", False),
      fixed("model.gla.features_from", "masked"),
  )
