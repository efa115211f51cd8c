"""The ONNX engine's room: lorafleet's front (serve/routes.py, auth, limits, the registry and its
gate, metrics, templates, the error shape) over onnxruntime, for edge boxes.

- graph.py: the exported decoder with one adapter per batch row, on onnxruntime;
- engine.py: the loop thread that batches requests continuously over it (adapters, sampling, cancellation);
- protocol.py: what an OpenAI request asks of it, and its answers in the openai package's types;
- registry.py: the registry over converted edge adapters (lorafleet/edge_adapter.py), with their gate;
- server.py: the Backend the front calls, the app, `lorafleet serve-edge`.

Nothing here imports torch, vLLM or Ray: the edge image carries none of them.
"""
