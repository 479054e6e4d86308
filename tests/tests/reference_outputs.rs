//! tract's outputs match the onnxruntime reference outputs that models/make_models.py wrote.

use std::fs::File;

use ndarray_npy::NpzReader;
use plaster_agent::inference::{
    predicted_labels, select_runtime, to_vec, DeviceKind, ModelSource, OnnxModel, PlanOptions,
    Precision, PreparedModel,
};
use plaster_agent_tests::model_path;
use tract_onnx::prelude::tract_ndarray::{ArrayD, IxDyn};
use tract_onnx::prelude::*;

/// Absolute tolerance on probabilities and activations: float32 kernels sum in different
/// orders in tract and onnxruntime (and differ by ISA), so bit equality is not expected.
const TOLERANCE: f32 = 1e-4;

fn read(npz: &str, name: &str) -> ArrayD<f32> {
    let mut npz = NpzReader::new(File::open(model_path(npz)).unwrap()).unwrap();
    npz.by_name::<_, IxDyn>(name).unwrap()
}

fn prepare(rel: &str, batch: usize) -> PreparedModel {
    let model = OnnxModel::load(ModelSource::resolve(&model_path(rel)).unwrap()).unwrap();
    let cpu = select_runtime(DeviceKind::Cpu).unwrap();
    PreparedModel::prepare(&model, batch, &cpu, PlanOptions::new(Precision::F32, 1)).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn digits_matches_onnxruntime_on_every_sample() {
    let x = read("reference/digits.npz", "x");
    let expected_probabilities = read("reference/digits.npz", "probabilities");
    let mut npz = NpzReader::new(File::open(model_path("reference/digits.npz")).unwrap()).unwrap();
    let expected_labels: ArrayD<i64> = npz.by_name::<_, IxDyn>("label").unwrap();
    let n = x.shape()[0];

    // The whole validation set as one batch: the dynamic batch axis takes any size.
    let model = prepare("digits", n);
    let mut session = model.session().unwrap();
    let outputs = session.run(tvec![Tensor::from(x).into_tvalue()]).unwrap();
    let labels = predicted_labels(&outputs, n).unwrap();
    assert_eq!(labels, expected_labels.iter().copied().collect::<Vec<_>>());
    let probabilities = to_vec::<f32>(&outputs[1].cast_to::<f32>().unwrap()).unwrap();
    let diff = max_abs_diff(&probabilities, expected_probabilities.as_slice().unwrap());
    assert!(diff < TOLERANCE, "max |tract - onnxruntime| = {diff}");
}

#[test]
fn squeezenet_matches_onnxruntime() {
    let input = read("reference/squeezenet.npz", "input");
    let expected = read("reference/squeezenet.npz", "output");
    let model = prepare("squeezenet/model.onnx", 1);
    let mut session = model.session().unwrap();
    let outputs = session
        .run(tvec![Tensor::from(input).into_tvalue()])
        .unwrap();
    assert_eq!(outputs[0].shape(), expected.shape());
    let output = to_vec::<f32>(&outputs[0].cast_to::<f32>().unwrap()).unwrap();
    let diff = max_abs_diff(&output, expected.as_slice().unwrap());
    assert!(diff < TOLERANCE, "max |tract - onnxruntime| = {diff}");
    let argmax = |v: &[f32]| (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap();
    assert_eq!(argmax(&output), argmax(expected.as_slice().unwrap()));
}
