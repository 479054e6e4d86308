"""Drives the agent's inference API with standard, unmodified client libraries.

Triton's HTTP client (tritonclient.http, a KServe v2 / Open Inference Protocol client) checks
health and metadata and runs the digits model with binary and JSON tensors; the predictions
must equal onnxruntime's on the same inputs (models/reference/digits.npz). prometheus_client's
text parser then reads /metrics. Prints one JSON line with what it saw; exits non-zero (with
the reason) on any mismatch.

    python3 tests/clients/kserve_client.py HOST:PORT MODELS_DIR
"""

import json
import sys
import urllib.request

import numpy as np
import tritonclient.http as httpclient
from prometheus_client.parser import text_string_to_metric_families


def scores_argmax(result, output):
    return result.as_numpy(output).argmax(axis=1)


def main() -> None:
    url, models = sys.argv[1], sys.argv[2]
    reference = np.load(f"{models}/reference/digits.npz")
    x = reference["x"][:24].astype(np.float32)
    expected = reference["probabilities"][:24].argmax(axis=1)

    client = httpclient.InferenceServerClient(url=url)
    assert client.is_server_live(), "server not live"
    assert client.is_server_ready(), "server not ready"
    server = client.get_server_metadata()
    assert server["name"] == "plaster-agent", server
    assert "binary_tensor_data" in server["extensions"], server
    assert client.is_model_ready("digits"), "model not ready"
    metadata = client.get_model_metadata("digits")
    (inp,) = metadata["inputs"]
    assert inp["datatype"] == "FP32" and inp["shape"] == [-1, 64], inp
    # The digits classifier answers a label (INT64) and class probabilities (FP32).
    assert [o["datatype"] for o in metadata["outputs"]] == ["INT64", "FP32"], metadata
    output = metadata["outputs"][1]["name"]

    seen = {}
    for binary in (True, False):
        for batch in (1, 8):
            predictions = []
            for start in range(0, len(x), batch):
                rows = x[start : start + batch]
                tensor = httpclient.InferInput(inp["name"], list(rows.shape), "FP32")
                tensor.set_data_from_numpy(rows, binary_data=binary)
                wanted = [httpclient.InferRequestedOutput(output, binary_data=binary),
                          httpclient.InferRequestedOutput("label", binary_data=binary)]
                result = client.infer("digits", [tensor], outputs=wanted, request_id=f"r{start}")
                labels = result.as_numpy("label")
                assert labels.dtype == np.int64, labels.dtype
                assert (labels == scores_argmax(result, output)).all(), "label output disagrees with probabilities"
                scores = result.as_numpy(output)
                assert scores.shape[0] == len(rows), scores.shape
                predictions.extend(scores.argmax(axis=1).tolist())
                response = result.get_response()
                assert response["id"] == f"r{start}", response
                params = response["parameters"]
                assert params["queue_us"] >= 0 and params["compute_us"] > 0, params
            mismatches = int((np.array(predictions) != expected).sum())
            assert mismatches == 0, f"binary={binary} batch={batch}: {mismatches} predictions differ from onnxruntime"
            seen[f"{'binary' if binary else 'json'}_batch{batch}"] = len(predictions)

    try:
        client.get_model_metadata("no-such-model")
        raise AssertionError("an unknown model was found")
    except httpclient.InferenceServerException as e:
        assert "unknown model" in e.message(), e.message()

    text = urllib.request.urlopen(f"http://{url}/metrics").read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    api = [s.value for s in families["plaster_inferences"].samples
           if s.name == "plaster_inferences_total" and s.labels["source"] == "api"]
    assert api and api[0] >= 4 * len(x), api
    assert families["plaster_latency_seconds"].type == "histogram"
    assert families["plaster_model_info"].samples[0].labels["name"] == "digits"
    seen["metric_families"] = len(families)
    seen["api_inferences"] = api[0]
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
