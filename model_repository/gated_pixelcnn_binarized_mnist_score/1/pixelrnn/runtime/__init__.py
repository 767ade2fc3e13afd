"""The torch-free runtime layer (numpy + onnxruntime): what a deployed model repository
executes, and what the server, the client, the benches and the tests share.

    tensor_names  names of the tensors crossing every exported graph
    protocol      what clients send to and get from the two Triton models
    manifest      an export folder's manifest.json and the checksums it records
    randomness    the one random stream and its inverse-CDF draw
    onnx_graphs   onnxruntime runners of the exported cell, scorer and condition graphs
    rowloop       the one row-sampling loop (images identical on every path)
    runner        the row loop's runner on the exported graphs
    engine        cross-sequence scheduling of many sampling jobs into shared cell calls

It imports nothing of the project outside this folder, so server/repository.py copies it
whole into every model of a repository, beside model.py.
"""
