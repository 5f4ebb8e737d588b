"""The default demo's scaffolding, apart from NVLM itself: the synthetic task (synth) and the
warm-up that stands in for a pretrained ViT (warmup). The tiny demo model starts from random
weights; NVLM starts from a pretrained InternViT and LLM (docs/nvlm.md section 10)."""
