"""PyTorch interop: import public PyTorch weights (Hugging Face CLIP / RoBERTa / BERT, M3AE
checkpoints) into the parameter tree, and export trained parameters back to PyTorch."""
