use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::DimLike;
use tract_onnx::tract_hir::infer::Factoid;

use super::cache::ModelCache;
use super::InferenceError;

/// File name of the model inside a bundle (PROTOCOL.md, "Model bundle").
pub const BUNDLE_MODEL: &str = "model.onnx";
/// File name of the optional labelled validation set inside a bundle.
pub const BUNDLE_DATASET: &str = "dataset.npz";

/// Where a model comes from: a plain `.onnx` file or a bundle directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelSource {
    /// A human name: the bundle directory's name, or the file's stem.
    pub name: String,
    pub model_path: PathBuf,
    pub bundle_dir: Option<PathBuf>,
}

impl ModelSource {
    pub fn resolve(path: &Path) -> Result<ModelSource, InferenceError> {
        let meta = fs::metadata(path).map_err(|e| io_error(path, e))?;
        if meta.is_dir() {
            let model_path = path.join(BUNDLE_MODEL);
            if !model_path.is_file() {
                return Err(InferenceError::Bundle {
                    path: path.to_path_buf(),
                    message: format!("no {BUNDLE_MODEL} in the bundle directory"),
                });
            }
            return Ok(ModelSource {
                name: dir_name(path),
                model_path,
                bundle_dir: Some(path.to_path_buf()),
            });
        }
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
        // `models/squeezenet/model.onnx` is better named after its directory.
        let name = match (stem, path.parent()) {
            ("model", Some(parent)) if !parent.as_os_str().is_empty() => dir_name(parent),
            _ => stem.to_string(),
        };
        Ok(ModelSource {
            name,
            model_path: path.to_path_buf(),
            bundle_dir: None,
        })
    }

    /// The bundle's own validation set, when the model came from a bundle that has one.
    pub fn bundle_dataset(&self) -> Option<PathBuf> {
        let path = self.bundle_dir.as_ref()?.join(BUNDLE_DATASET);
        path.is_file().then_some(path)
    }
}

fn dir_name(path: &Path) -> String {
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    canonical
        .file_name()
        .and_then(|s| s.to_str())
        .unwrap_or("model")
        .to_string()
}

fn io_error(path: &Path, e: std::io::Error) -> InferenceError {
    if e.kind() == ErrorKind::NotFound {
        InferenceError::NotFound {
            path: path.to_path_buf(),
        }
    } else {
        InferenceError::Io {
            path: path.to_path_buf(),
            source: e,
        }
    }
}

/// A model input as the ONNX file declares it; `None` marks a dynamic dimension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputSpec {
    pub name: String,
    pub datum_type: DatumType,
    pub shape: Vec<Option<usize>>,
}

impl InputSpec {
    /// Whether axis 0 is dynamic, so the model can run any batch size.
    pub fn has_dynamic_batch(&self) -> bool {
        matches!(self.shape.first(), Some(None))
    }

    /// The fixed batch size, when axis 0 is fixed.
    pub fn fixed_batch(&self) -> Option<usize> {
        self.shape.first().copied().flatten()
    }
}

/// A parsed ONNX model, not yet bound to a batch size or a runtime.
#[derive(Debug)]
pub struct OnnxModel {
    pub source: ModelSource,
    pub file_bytes: u64,
    pub sha256: String,
    /// Learned parameters: elements of the floating-point initializers and `Constant` nodes.
    pub parameters: u64,
    pub inputs: Vec<InputSpec>,
    /// The graph's output names, in order.
    pub outputs: Vec<String>,
    model: InferenceModel,
    cache: Option<ModelCache>,
}

impl OnnxModel {
    pub fn load(source: ModelSource) -> Result<OnnxModel, InferenceError> {
        let path = source.model_path.clone();
        let bytes = fs::read(&path).map_err(|e| io_error(&path, e))?;
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let onnx = tract_onnx::onnx();
        let proto = onnx
            .proto_model_for_read(&mut bytes.as_slice())
            .map_err(|e| InferenceError::NotOnnx {
                path: path.clone(),
                reason: format!("{e:#}"),
            })?;
        check_is_onnx(&path, &proto)?;
        let parameters = parameters(&proto);
        let outputs = proto
            .graph
            .as_ref()
            .map(|g| g.output.iter().map(|o| o.name.clone()).collect())
            .unwrap_or_default();
        let unsupported = unsupported_ops(&onnx, &proto);
        if !unsupported.is_empty() {
            return Err(InferenceError::UnsupportedOps {
                path,
                ops: unsupported,
            });
        }
        let model_dir = path.parent().and_then(|p| p.to_str());
        let model = onnx
            .parse(&proto, model_dir)
            .map_err(|e| InferenceError::Invalid {
                path: path.clone(),
                message: format!("{e:#}"),
            })?
            .model;
        let mut inputs = Vec::new();
        for (ix, outlet) in model
            .input_outlets()
            .map_err(|e| invalid(&path, e))?
            .iter()
            .enumerate()
        {
            let fact = model.input_fact(ix).map_err(|e| invalid(&path, e))?;
            let name = model.node(outlet.node).name.clone();
            let datum_type =
                fact.datum_type
                    .concretize()
                    .ok_or_else(|| InferenceError::Invalid {
                        path: path.clone(),
                        message: format!("input \"{name}\" has no declared element type"),
                    })?;
            let shape = match fact.shape.concretize() {
                Some(dims) => dims.iter().map(|d| d.to_usize().ok()).collect(),
                None => fact
                    .shape
                    .dims()
                    .map(|d| d.concretize().and_then(|d| d.to_usize().ok()))
                    .collect(),
            };
            inputs.push(InputSpec {
                name,
                datum_type,
                shape,
            });
        }
        Ok(OnnxModel {
            source,
            file_bytes: bytes.len() as u64,
            sha256,
            parameters,
            inputs,
            outputs,
            model,
            cache: None,
        })
    }

    /// Keeps decluttered graphs in `cache` (see [`ModelCache`]); `None` turns caching off.
    pub fn with_cache(mut self, cache: Option<ModelCache>) -> OnnxModel {
        self.cache = cache;
        self
    }

    /// The model with every input fixed for `batch` (dynamic axis 0 becomes `batch`),
    /// type-checked and decluttered: the form tract's runtimes prepare.
    pub fn typed(&self, batch: usize) -> Result<TypedModel, InferenceError> {
        if let Some(model) = self
            .cache
            .as_ref()
            .and_then(|cache| cache.load(&self.sha256, batch))
        {
            return Ok(model);
        }
        let mut model = self.model.clone();
        for (ix, spec) in self.inputs.iter().enumerate() {
            let shape = self.concrete_shape(spec, batch)?;
            model
                .set_input_fact(ix, InferenceFact::dt_shape(spec.datum_type, shape))
                .map_err(|e| self.invalid(e))?;
        }
        let typed = model.into_typed().map_err(|e| self.invalid(e))?;
        let typed = typed.into_decluttered().map_err(|e| self.invalid(e))?;
        if let Some(cache) = &self.cache {
            cache.store(&self.sha256, batch, &typed);
        }
        Ok(typed)
    }

    fn concrete_shape(&self, spec: &InputSpec, batch: usize) -> Result<Vec<usize>, InferenceError> {
        spec.shape
            .iter()
            .enumerate()
            .map(|(axis, dim)| match (axis, dim) {
                (_, Some(d)) => Ok(*d),
                (0, None) => Ok(batch),
                (axis, None) => Err(self.invalid_msg(format!(
                    "input \"{}\" has a dynamic dimension at axis {axis}; only the batch axis (0) may be dynamic",
                    spec.name
                ))),
            })
            .collect()
    }

    /// The batch the model runs at when the caller has no preference: its fixed batch, or 1.
    pub fn natural_batch(&self) -> usize {
        self.inputs
            .first()
            .and_then(|i| i.fixed_batch())
            .unwrap_or(1)
    }

    pub fn has_dynamic_batch(&self) -> bool {
        !self.inputs.is_empty() && self.inputs.iter().all(|i| i.has_dynamic_batch())
    }

    pub(crate) fn invalid(&self, e: impl Into<anyhow::Error>) -> InferenceError {
        invalid(&self.source.model_path, e)
    }

    pub(crate) fn invalid_msg(&self, message: impl Into<String>) -> InferenceError {
        InferenceError::Invalid {
            path: self.source.model_path.clone(),
            message: message.into(),
        }
    }
}

fn invalid(path: &Path, e: impl Into<anyhow::Error>) -> InferenceError {
    InferenceError::Invalid {
        path: path.to_path_buf(),
        message: format!("{:#}", e.into()),
    }
}

/// Protobuf decoding is lenient: many non-ONNX files decode into an empty message. A model
/// has an IR version and a graph with at least one node.
fn check_is_onnx(path: &Path, proto: &ModelProto) -> Result<(), InferenceError> {
    let reason = if proto.ir_version <= 0 {
        Some("no ONNX IR version")
    } else {
        match &proto.graph {
            None => Some("no graph"),
            Some(graph) if graph.node.is_empty() => Some("the graph has no nodes"),
            Some(_) => None,
        }
    };
    match reason {
        Some(reason) => Err(InferenceError::NotOnnx {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        }),
        None => Ok(()),
    }
}

/// Elements of the model's floating-point constant tensors: the initializers and the values of
/// `Constant` nodes. Integer constants are shapes, indices and class ids, not learned weights.
/// Counted on the ONNX graph, before tract adds scalars of its own while decluttering.
fn parameters(proto: &ModelProto) -> u64 {
    use tract_onnx::pb::tensor_proto::DataType;
    let is_float = |dt: i32| {
        [
            DataType::Float,
            DataType::Float16,
            DataType::Double,
            DataType::Bfloat16,
        ]
        .iter()
        .any(|f| *f as i32 == dt)
    };
    let elements = |t: &tract_onnx::pb::TensorProto| -> u64 {
        if is_float(t.data_type) {
            t.dims.iter().map(|d| (*d).max(0) as u64).product()
        } else {
            0
        }
    };
    let Some(graph) = &proto.graph else { return 0 };
    let initializers: u64 = graph.initializer.iter().map(elements).sum();
    let constants: u64 = graph
        .node
        .iter()
        .filter(|n| n.op_type == "Constant")
        .flat_map(|n| n.attribute.iter())
        .filter_map(|a| a.t.as_ref())
        .map(elements)
        .sum();
    initializers + constants
}

/// Ops tract has no builder for, with the first node using each, in graph order.
fn unsupported_ops(onnx: &tract_onnx::Onnx, proto: &ModelProto) -> Vec<(String, String)> {
    let mut found: Vec<(String, String)> = Vec::new();
    let Some(graph) = &proto.graph else {
        return found;
    };
    for node in &graph.node {
        if !onnx.op_register.0.contains_key(&node.op_type)
            && !found.iter().any(|(op, _)| op == &node.op_type)
        {
            let name = if node.name.is_empty() {
                node.output.first().cloned().unwrap_or_default()
            } else {
                node.name.clone()
            };
            found.push((node.op_type.clone(), name));
        }
    }
    found
}
