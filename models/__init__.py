"""Export scripts that produce sample ONNX models for testing graphopt."""
