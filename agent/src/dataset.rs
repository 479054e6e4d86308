//! Labelled validation sets in NumPy's NPZ format: `x` holds the inputs with the batch on axis
//! 0, `y` the integer class labels (PRODUCT.md, "How each letter is measured").

use std::fs::File;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use ndarray_npy::{NpzReader, ReadNpzError};
use tract_onnx::prelude::tract_ndarray::{ArrayD, IxDyn};
use tract_onnx::prelude::*;

/// Why a dataset cannot be used; each message names the file and the array at fault.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("dataset \"{}\": file not found", path.display())]
    NotFound { path: PathBuf },

    #[error("dataset \"{}\": not an NPZ archive ({reason})", path.display())]
    NotNpz { path: PathBuf, reason: String },

    #[error("dataset \"{}\": no array \"{name}\" ({role}); it holds: {}", path.display(), found.join(", "))]
    MissingArray {
        path: PathBuf,
        name: &'static str,
        role: &'static str,
        found: Vec<String>,
    },

    #[error("dataset \"{}\": array \"{name}\" {message}", path.display())]
    BadArray {
        path: PathBuf,
        name: &'static str,
        message: String,
    },

    #[error("dataset \"{}\": y has {labels} labels but x has {samples} samples", path.display())]
    LengthMismatch {
        path: PathBuf,
        labels: usize,
        samples: usize,
    },

    #[error(
        "dataset \"{}\": x samples have shape {sample_shape:?} but model input \"{input}\" expects {expected:?} per sample",
        path.display()
    )]
    ShapeMismatch {
        path: PathBuf,
        sample_shape: Vec<usize>,
        input: String,
        expected: Vec<usize>,
    },

    #[error("dataset \"{}\": model has {inputs} inputs; a dataset can only feed a single-input model", path.display())]
    MultiInput { path: PathBuf, inputs: usize },
}

/// A loaded, checked validation set.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub path: PathBuf,
    /// The inputs, batch on axis 0, in the element type the file holds.
    pub x: Tensor,
    pub y: Vec<i64>,
}

impl Dataset {
    pub fn load(path: &Path) -> Result<Dataset, DatasetError> {
        let file = File::open(path).map_err(|e| match e.kind() {
            ErrorKind::NotFound => DatasetError::NotFound {
                path: path.to_path_buf(),
            },
            _ => DatasetError::NotNpz {
                path: path.to_path_buf(),
                reason: e.to_string(),
            },
        })?;
        let not_npz = |e: ReadNpzError| DatasetError::NotNpz {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let mut npz = NpzReader::new(file).map_err(not_npz)?;
        let names = npz.names().map_err(not_npz)?;
        for (name, role) in [("x", "inputs"), ("y", "integer labels")] {
            if !names.iter().any(|n| n == name) {
                return Err(DatasetError::MissingArray {
                    path: path.to_path_buf(),
                    name,
                    role,
                    found: names.clone(),
                });
            }
        }
        let x = read_any(&mut npz, "x").map_err(|message| DatasetError::BadArray {
            path: path.to_path_buf(),
            name: "x",
            message,
        })?;
        let y = read_labels(&mut npz).map_err(|message| DatasetError::BadArray {
            path: path.to_path_buf(),
            name: "y",
            message,
        })?;
        let samples = x.shape().first().copied().unwrap_or(0);
        if x.rank() == 0 || samples == 0 {
            return Err(DatasetError::BadArray {
                path: path.to_path_buf(),
                name: "x",
                message: format!(
                    "has shape {:?}; it needs a batch axis with at least one sample",
                    x.shape()
                ),
            });
        }
        if y.len() != samples {
            return Err(DatasetError::LengthMismatch {
                path: path.to_path_buf(),
                labels: y.len(),
                samples,
            });
        }
        Ok(Dataset {
            path: path.to_path_buf(),
            x,
            y,
        })
    }

    pub fn len(&self) -> usize {
        self.y.len()
    }

    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// Checks that every sample fits the model's (only) input, whose per-sample shape is
    /// `input_shape` without its batch axis.
    pub fn check_fits(&self, inputs: &[(String, Vec<usize>)]) -> Result<(), DatasetError> {
        if inputs.len() != 1 {
            return Err(DatasetError::MultiInput {
                path: self.path.clone(),
                inputs: inputs.len(),
            });
        }
        let (name, shape) = &inputs[0];
        let expected = shape.get(1..).unwrap_or_default().to_vec();
        let sample_shape = self.x.shape()[1..].to_vec();
        if sample_shape != expected {
            return Err(DatasetError::ShapeMismatch {
                path: self.path.clone(),
                sample_shape,
                input: name.clone(),
                expected,
            });
        }
        Ok(())
    }

    /// Samples `start..start + batch` as one batch tensor; past the end the batch is padded
    /// with zeros (the caller ignores the padded predictions).
    pub fn batch(&self, start: usize, batch: usize) -> TractResult<Tensor> {
        let end = (start + batch).min(self.len());
        let taken = end - start;
        let slice = self.x.slice(0, start, end)?;
        if taken == batch {
            return Ok(slice);
        }
        let mut shape = self.x.shape().to_vec();
        shape[0] = batch - taken;
        let pad = Tensor::zero_dt(self.x.datum_type(), &shape)?;
        Tensor::stack_tensors(0, &[slice, pad])
    }
}

fn read_any(npz: &mut NpzReader<File>, name: &str) -> Result<Tensor, String> {
    macro_rules! try_type {
        ($($t:ty),*) => {
            $(
                match npz.by_name::<_, IxDyn>(name) {
                    Ok(a) => { let a: ArrayD<$t> = a; return Ok(Tensor::from(a)); }
                    Err(ReadNpzError::Npy(ndarray_npy::ReadNpyError::WrongDescriptor(_))) => {}
                    Err(e) => return Err(e.to_string()),
                }
            )*
        };
    }
    try_type!(f32, f64, i64, i32, u8, i8, u16, i16, u32, u64);
    Err("has an element type that is not a float or integer (use float32 inputs)".to_string())
}

fn read_labels(npz: &mut NpzReader<File>) -> Result<Vec<i64>, String> {
    let tensor = read_any(npz, "y")?;
    if tensor.datum_type().is_float() {
        return Err(format!(
            "has element type {:?}; labels must be integers",
            tensor.datum_type()
        ));
    }
    if tensor.rank() != 1 {
        return Err(format!(
            "has shape {:?}; labels must be one-dimensional",
            tensor.shape()
        ));
    }
    let labels = tensor.cast_to::<i64>().map_err(|e| e.to_string())?;
    crate::inference::to_vec::<i64>(&labels).map_err(|e| e.to_string())
}
