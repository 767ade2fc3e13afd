"""PixelRNN / PixelCNN image models from training to a streaming Triton inference server.

One import root; the pipeline's folders are its subpackages (pyproject.toml maps them):

    pixelrnn.training   data, masked convolutions, models, training and evaluation (torch)
    pixelrnn.export     row cells with explicit state, ONNX export, TensorRT, build_engine
    pixelrnn.runtime    the torch-free layer every stage shares (tensor names, protocol,
                        random stream, row loop, image I/O); copied into model repositories
    pixelrnn.server     the model repository writer, its Triton glue, the row engine, the
                        tritonserver launcher and the replicas behind nginx
    pixelrnn.client     gRPC client library and CLI (torch-free)
    pixelrnn.web        the live web page's gateway

Imports run one way: training -> export -> server -> client (runtime below them all).
"""
__version__ = "0.2.0"
