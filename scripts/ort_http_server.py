#!/usr/bin/env python3
"""A minimal onnxruntime HTTP server answering the Open Inference Protocol v2 infer call:
the peer against which outpost-infer's HTTP throughput is measured (benchmark only).

  python3 scripts/ort_http_server.py --model M.onnx --name NAME --port 8101 [--threads 1]

POST /v2/models/NAME/infer with JSON tensors -> JSON outputs (flattened data), HTTP/1.1
keep-alive, one thread per connection (ThreadingHTTPServer), TCP_NODELAY and one write per
reply (a stalled peer would flatter us). GET /v2/health/ready -> 200.
"""
import argparse
import json
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import onnxruntime as ort

DT = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "INT64": np.int64,
      "INT32": np.int32, "INT16": np.int16, "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_}
BACK = {np.dtype(v): k for k, v in DT.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads; 0 = onnxruntime's default")
    a = ap.parse_args()
    opts = ort.SessionOptions()
    if a.threads:
        opts.intra_op_num_threads = a.threads
    sess = ort.InferenceSession(a.model, opts, providers=["CPUExecutionProvider"])
    out_names = [o.name for o in sess.get_outputs()]
    path = f"/v2/models/{a.name}/infer"

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def setup(self):
            super().setup()
            # Without it a small reply waits for the client's delayed ACK (~40 ms).
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def reply(self, code, obj):
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            # Headers and body in one write: two small writes stall on Nagle + delayed ACK.
            self._headers_buffer.append(b"\r\n")
            self._headers_buffer.append(body)
            self.wfile.write(b"".join(self._headers_buffer))
            self._headers_buffer = []

        def do_GET(self):
            self.reply(200, {"ready": True})

        def do_POST(self):
            n = int(self.headers.get("Content-Length", 0))
            raw = self.rfile.read(n)
            if self.path != path:
                return self.reply(404, {"error": "no such model"})
            try:
                req = json.loads(raw)
                feeds = {i["name"]: np.asarray(i["data"], dtype=DT[i["datatype"]]).reshape(i["shape"])
                         for i in req["inputs"]}
                outs = sess.run(None, feeds)
            except Exception as e:  # noqa: BLE001 - a benchmark peer, errors go back as 400
                return self.reply(400, {"error": str(e)})
            self.reply(200, {"model_name": a.name, "outputs": [
                {"name": nm, "datatype": BACK.get(o.dtype, str(o.dtype)), "shape": list(o.shape),
                 "data": o.ravel().tolist()} for nm, o in zip(out_names, outs)]})

    ThreadingHTTPServer(("127.0.0.1", a.port), H).serve_forever()


if __name__ == "__main__":
    main()
