"""The torch-free runtime layer (numpy + onnxruntime): what a deployed model repository
executes, and what the server, the client, the benches and the tests share.

    tensor_names  names of the tensors crossing every exported graph
    protocol      what clients send to and get from the Triton models
    request       what a sampling request may ask for: one rule per field
    manifest      an export folder's manifest.json and the checksums it records
    randomness    the one random stream and its inverse-CDF draw
    onnx_graphs   onnxruntime runners of the exported cell, scorer and condition graphs
    rowloop       the one row-sampling loop (images identical on every path)
    runner        the row loop's runner on the exported graphs
    ood           out-of-distribution scores from likelihoods (likelihood ratio, complexity)
    images        PNG grids of samples and completions; PNG / .npy files read back as levels
    datasets      the named data sets (binarized MNIST, Fashion-MNIST, ...) and their file readers
    data_flags    the command-line flags that name a data set

It imports nothing of the project outside this folder. server/repository.py copies into a
model of a repository the modules its Triton glue imports, directly or not; images and
datasets import pillow and scikit-image only inside the functions that need them, and the glue
does not import them.
"""
