"""nn.Modules built on latentembed.ops: norms, rotary, attention, MLP, pooling, LoRA, losses."""
