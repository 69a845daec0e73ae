"""ROCO image-text retrieval on the 2,000 seeded test pairs (`mpma-data build roco_retrieval`):
R@1/5/10 both ways. `:zero_shot` (default) ranks with the pre-trained GLA global embeddings;
`:finetune` first trains them with the global contrastive loss on ROCO's training pairs
(`mpma-data build roco`, data.train_dataset). retrieval.rerank_k > 0 re-orders each query's top-k
by the ITM head's match probability."""
from mpma_jax.configs.finetune import common


def get_config(variant: str = "zero_shot"):
  c = common.base("retrieval", "roco_retrieval")
  c.protocols = ("clean",)  # no vocabulary and a fixed test draw: the protocols coincide
  c.data.max_len = 64  # captions: the pre-training length
  c.data.train_dataset = "roco"  # training / validation pairs for :finetune
  c.data.num_select = 1000  # validation pairs ranked for model selection
  c.retrieval = common.ml_collections.ConfigDict()
  c.retrieval.rerank_k = 0  # ITM re-ranking of each query's top-k; 0 = GLA similarity only
  c.train.epochs = 0 if variant == "zero_shot" else 10  # [M3AE: 10]
  c.train.batch_size = 256  # [M3AE] in-batch negatives
  c.optim.head_mult = 5.0  # [M3AE]; there is no new head (the GLA heads train at fusion_mult)
  if variant not in ("zero_shot", "finetune"):
    raise ValueError(f"variant {variant!r}: expected zero_shot | finetune")
  return c
