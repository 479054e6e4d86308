use std::path::PathBuf;

/// Everything that can go wrong loading or running a model. Messages name the file and the
/// node or op at fault; tract's error chain is flattened into the message once, here.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    #[error("model \"{}\": file not found", path.display())]
    NotFound { path: PathBuf },

    #[error("model \"{}\": {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("model \"{}\": not an ONNX model ({reason})", path.display())]
    NotOnnx { path: PathBuf, reason: String },

    #[error("model \"{}\": unsupported op {}", path.display(), describe_ops(ops))]
    UnsupportedOps {
        path: PathBuf,
        ops: Vec<(String, String)>,
    },

    #[error("model \"{}\": {message}", path.display())]
    Invalid { path: PathBuf, message: String },

    #[error("bundle \"{}\": {message}", path.display())]
    Bundle { path: PathBuf, message: String },

    #[error("--device cuda: {0}")]
    CudaUnavailable(String),

    #[error("inference failed: {0}")]
    Run(String),
}

impl InferenceError {
    pub(crate) fn run(e: impl Into<anyhow::Error>) -> InferenceError {
        InferenceError::Run(format!("{:#}", e.into()))
    }
}

/// `"NonMaxSuppression" (node "nms")`, or several of them separated by commas.
fn describe_ops(ops: &[(String, String)]) -> String {
    ops.iter()
        .map(|(op, node)| format!("\"{op}\" (node \"{node}\")"))
        .collect::<Vec<_>>()
        .join(", ")
}
