"""The embedder (instruction-aware last-token pooling on a decoder backbone), backbones, LoRA and ONNX export."""
