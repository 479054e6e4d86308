"""The peer of the agent's inference API: what a user would write instead, a small Python
HTTP server around onnxruntime, speaking the same Open Inference Protocol subset (health,
model metadata, infer with JSON or binary tensors) so `plaster-agent bench --target` measures
both the same way. A measuring tool, not a product: one model, FP32 inputs.

    python3 bench/ort_server.py MODEL.onnx NAME PORT [THREADS]

ThreadingHTTPServer answers each connection on its own thread; onnxruntime releases the GIL
while it runs, so concurrent requests run concurrently (no batching, as such servers go).
"""

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import onnxruntime as ort

DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}


def main() -> None:
    path, name, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    threads = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    outputs = session.get_outputs()

    def spec(t):
        shape = [d if isinstance(d, int) else -1 for d in t.shape]
        return {"name": t.name, "datatype": "FP32", "shape": shape}

    metadata = json.dumps({"name": name, "platform": "onnxruntime",
                           "inputs": [spec(t) for t in inputs],
                           "outputs": [spec(t) for t in outputs]}).encode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in separate writes: without this, Nagle's algorithm and the
        # client's delayed ACK add 40 ms to every keep-alive answer.
        disable_nagle_algorithm = True

        def log_message(self, *args):
            pass

        def reply(self, status, body, headers=()):
            self.send_response(status)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path in ("/v2/health/live", "/v2/health/ready"):
                self.reply(200, b"{}", [("Content-Type", "application/json")])
            elif self.path == f"/v2/models/{name}":
                self.reply(200, metadata, [("Content-Type", "application/json")])
            else:
                self.reply(404, b'{"error":"not found"}', [("Content-Type", "application/json")])

        def do_POST(self):
            if self.path != f"/v2/models/{name}/infer":
                self.reply(404, b'{"error":"not found"}')
                return
            body = self.rfile.read(int(self.headers["Content-Length"]))
            header_length = self.headers.get("Inference-Header-Content-Length")
            if header_length is not None:
                request = json.loads(body[: int(header_length)])
                binary = memoryview(body)[int(header_length):]
            else:
                request = json.loads(body)
                binary = memoryview(b"")
            feeds, offset = {}, 0
            for tensor in request["inputs"]:
                dtype = DTYPES[tensor["datatype"]]
                size = tensor.get("parameters", {}).get("binary_data_size")
                if size is not None:
                    array = np.frombuffer(binary[offset: offset + size], dtype=dtype)
                    offset += size
                else:
                    array = np.asarray(tensor["data"], dtype=dtype)
                feeds[tensor["name"]] = array.reshape(tensor["shape"])
            results = session.run(None, feeds)
            want_binary = request.get("parameters", {}).get("binary_data_output", False)
            out, tail = [], []
            for meta, value in zip(outputs, results):
                entry = {"name": meta.name, "datatype": "FP32", "shape": list(value.shape)}
                if want_binary:
                    raw = np.ascontiguousarray(value, dtype=np.float32).tobytes()
                    entry["parameters"] = {"binary_data_size": len(raw)}
                    tail.append(raw)
                else:
                    entry["data"] = value.astype(np.float32).ravel().tolist()
                out.append(entry)
            head = json.dumps({"model_name": name, "outputs": out}).encode()
            if want_binary:
                self.reply(200, head + b"".join(tail),
                           [("Content-Type", "application/octet-stream"),
                            ("Inference-Header-Content-Length", str(len(head)))])
            else:
                self.reply(200, head, [("Content-Type", "application/json")])

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print(f"serving {name} on 127.0.0.1:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
