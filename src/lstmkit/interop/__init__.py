"""Interoperability: save/load (.safetensors), ONNX export, finding LSTMs in checkpoint files."""
