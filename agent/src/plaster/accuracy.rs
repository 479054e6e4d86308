//! The A of PLASTER: top-1 accuracy of a prepared model on a labelled dataset.

use crate::dataset::Dataset;
use crate::inference::{predicted_labels, InferenceError, PreparedModel};
use tract_onnx::prelude::*;

/// Correct predictions out of the samples seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Top1 {
    pub correct: usize,
    pub samples: usize,
}

impl Top1 {
    pub fn value(&self) -> f64 {
        if self.samples == 0 {
            0.0
        } else {
            self.correct as f64 / self.samples as f64
        }
    }
}

/// Runs every sample of `dataset` through `model` at the model's batch (the last batch padded)
/// and counts top-1 hits. `progress` is told how many samples are done.
pub fn top1(
    model: &PreparedModel,
    dataset: &Dataset,
    progress: &mut dyn FnMut(usize),
) -> Result<Top1, InferenceError> {
    let batch = model.batch();
    let mut session = model.session()?;
    let mut correct = 0;
    let mut start = 0;
    while start < dataset.len() {
        let taken = batch.min(dataset.len() - start);
        let x = dataset.batch(start, batch).map_err(InferenceError::run)?;
        let outputs = session.run(tvec![model.conform_input(0, x)?])?;
        let predicted = predicted_labels(&outputs, taken)?;
        if predicted.len() < taken {
            return Err(InferenceError::Run(format!(
                "model returned {} predictions for a batch of {taken} samples",
                predicted.len()
            )));
        }
        correct += predicted
            .iter()
            .zip(&dataset.y[start..start + taken])
            .filter(|(p, y)| p == y)
            .count();
        start += taken;
        progress(start);
    }
    Ok(Top1 {
        correct,
        samples: dataset.len(),
    })
}
