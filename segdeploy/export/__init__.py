"""Export: torch -> ONNX (FP32) -> mixed-precision ONNX (FP16) -> TensorRT engine, each gated by parity."""
