"""Block-wise tuning after rounding (``--tune-steps``): each decoder block's codes and scales refined on the
block's output, the block run in torch from its ONNX graph (``torch_graph``)."""
