"""A live web page for a served model: watch samples stream in row by row, complete a drawing,
score an image (its NLL, a per-pixel heatmap and, where the model has a detector, whether it is
out of distribution). `python -m pixelrnn.web --triton HOST:GRPC_PORT --port 8080`; the gateway
(web/gateway.py) reaches Triton only through the gRPC client (client/), the page (web/static/) is
plain HTML/JS."""
